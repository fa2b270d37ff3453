//! Hand-written pre-tokenizers for byte-level BPE: the word splitting that
//! llama.cpp does with its `regex_exprs` per `tokenizer.ggml.pre` value.
//!
//! llama.cpp applies a list of expressions one after the other; each one
//! re-splits every piece produced so far, and the text between matches is kept
//! as pieces of its own. The big GPT-2 / Llama-3 / Qwen2 expressions have
//! hand-written matchers in llama.cpp (`unicode_regex_split_custom_*`); this
//! module follows those matchers step for step, including their quirks at
//! piece boundaries (a piece end behaves like end of text, so `\s+(?!\S)`
//! keeps all trailing spaces of a piece). The small expressions (`\p{N}`,
//! `[0-9][0-9][0-9]`, the punctuation run of the default set) run through
//! `std::regex` in llama.cpp; here they are simple scans with the same
//! leftmost, non-overlapping match semantics.
//!
//! All positions are in code points.

use super::unicode::{is_letter, is_number, is_punctuation, is_whitespace};

/// The pre-tokenizer families this crate implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT`: punctuation runs, the GPT-2
    /// expression, number runs, then runs of three ASCII digits.
    Default,
    /// The GPT-2 expression alone.
    Gpt2,
    /// Every `\p{N}` code point on its own, then the GPT-2 expression
    /// (smollm, starcoder, refact, command-r, codeshell, exaone, minerva).
    DigitsGpt2,
    /// The Llama-3 expression (numbers in groups of up to three).
    Llama3,
    /// The Qwen2 expression (every number code point on its own).
    Qwen2,
}

/// What llama.cpp derives from a `tokenizer.ggml.pre` name for byte-level BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PreConfig {
    /// The split rules.
    pub(crate) pre: PreTokenizer,
    /// A word that is a whole token is emitted as is (Llama-3 family).
    pub(crate) ignore_merges: bool,
    /// `clean_up_tokenization_spaces` when detokenizing.
    pub(crate) clean_spaces: bool,
}

impl PreConfig {
    /// The configuration llama.cpp uses for the pre-tokenizer `name`, or
    /// `None` for names this crate does not implement.
    pub(crate) fn from_name(name: &str) -> Option<PreConfig> {
        use PreTokenizer::*;
        let (pre, ignore_merges, clean_spaces) = match name {
            "" | "default" => (Default, false, true),
            // "gpt2" is not a llama.cpp name (it spells it "gpt-2"); accepted as an alias.
            "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais"
            | "exaone4" => (Gpt2, false, true),
            "trillion" | "granite-docling" => (Gpt2, false, false),
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                (DigitsGpt2, false, true)
            }
            "smollm" | "command-r" => (DigitsGpt2, false, false),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => (Llama3, true, true),
            "dbrx" | "smaug-bpe" => (Llama3, false, true),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => (Qwen2, false, false),
            "stablelm2" | "megrez" => (Qwen2, false, true),
            _ => return None,
        };
        Some(PreConfig {
            pre,
            ignore_merges,
            clean_spaces,
        })
    }
}

/// Splits `cpts` into pieces and returns their lengths in code points (they
/// add up to `cpts.len()`; none is zero).
pub(crate) fn split(pre: PreTokenizer, cpts: &[char]) -> Vec<usize> {
    let mut offsets = if cpts.is_empty() {
        Vec::new()
    } else {
        vec![cpts.len()]
    };
    let steps: &[Step] = match pre {
        PreTokenizer::Default => &[
            Step::PunctRuns,
            Step::Gpt2,
            Step::NumberRuns,
            Step::AsciiDigits3,
        ],
        PreTokenizer::Gpt2 => &[Step::Gpt2],
        PreTokenizer::DigitsGpt2 => &[Step::EachNumber, Step::Gpt2],
        PreTokenizer::Llama3 => &[Step::Llama3],
        PreTokenizer::Qwen2 => &[Step::Qwen2],
    };
    for step in steps {
        let mut out = Vec::with_capacity(offsets.len() * 2);
        let mut start = 0usize;
        for &len in &offsets {
            let end = start + len;
            let mut seg = Segment {
                cpts,
                ini: start,
                end,
                prev_end: start,
                out: &mut out,
            };
            match step {
                Step::PunctRuns => seg.class_runs(|c| {
                    is_punctuation(c) || matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|')
                }),
                Step::NumberRuns => seg.class_runs(is_number),
                Step::EachNumber => seg.each_number(),
                Step::AsciiDigits3 => seg.ascii_digits3(),
                Step::Gpt2 => seg.gpt2(),
                Step::Llama3 => seg.llama3_like(false),
                Step::Qwen2 => seg.llama3_like(true),
            }
            start = end;
        }
        offsets = out;
    }
    offsets
}

/// One expression of a pre-tokenizer's list.
#[derive(Clone, Copy)]
enum Step {
    /// `[\p{P}\$\+<=>\^~\|]+`
    PunctRuns,
    /// `\p{N}+`
    NumberRuns,
    /// `\p{N}`
    EachNumber,
    /// `[0-9][0-9][0-9]`
    AsciiDigits3,
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
    Gpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// As `Llama3` with `\p{N}` instead of `\p{N}{1,3}`.
    Qwen2,
}

/// The code point classes of one position; all false past the piece end.
#[derive(Clone, Copy, Default)]
struct Flags {
    in_range: bool,
    letter: bool,
    number: bool,
    space: bool,
}

/// One piece being re-split, with the output list of lengths.
struct Segment<'a> {
    cpts: &'a [char],
    ini: usize,
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<usize>,
}

impl Segment<'_> {
    /// The code point at `pos`, or `None` outside the piece.
    fn cpt(&self, pos: usize) -> Option<char> {
        if pos >= self.ini && pos < self.end {
            self.cpts.get(pos).copied()
        } else {
            None
        }
    }

    fn flags(&self, pos: usize) -> Flags {
        match self.cpt(pos) {
            Some(c) => Flags {
                in_range: true,
                letter: is_letter(c),
                number: is_number(c),
                space: is_whitespace(c),
            },
            None => Flags::default(),
        }
    }

    /// Ends a piece at `end` (no-op for an empty one); returns its length.
    fn add(&mut self, end: usize) -> usize {
        let len = end.saturating_sub(self.prev_end);
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }

    /// Emits `[start, end)` as a match, with any unmatched gap before it.
    fn add_match(&mut self, start: usize, end: usize) {
        self.add(start);
        self.add(end);
    }

    /// `[class]+`: maximal runs of code points in the class.
    fn class_runs(&mut self, class: impl Fn(char) -> bool) {
        let mut pos = self.ini;
        while pos < self.end {
            if self.cpt(pos).is_some_and(&class) {
                let start = pos;
                while self.cpt(pos).is_some_and(&class) {
                    pos += 1;
                }
                self.add_match(start, pos);
            } else {
                pos += 1;
            }
        }
        self.add(self.end);
    }

    /// `\p{N}`: every number code point on its own.
    fn each_number(&mut self) {
        for pos in self.ini..self.end {
            if self.cpt(pos).is_some_and(is_number) {
                self.add_match(pos, pos + 1);
            }
        }
        self.add(self.end);
    }

    /// `[0-9][0-9][0-9]`: leftmost non-overlapping triples of ASCII digits.
    fn ascii_digits3(&mut self) {
        let mut pos = self.ini;
        while pos < self.end {
            if (pos..pos + 3).all(|p| self.cpt(p).is_some_and(|c| c.is_ascii_digit())) {
                self.add_match(pos, pos + 3);
                pos += 3;
            } else {
                pos += 1;
            }
        }
        self.add(self.end);
    }

    /// The contraction alternatives; `case_insensitive` for the `(?i:...)` forms.
    /// Returns the end of the match at `pos`, if any.
    fn contraction(&self, pos: usize, case_insensitive: bool) -> Option<usize> {
        if self.cpt(pos)? != '\'' || pos + 1 >= self.end {
            return None;
        }
        let fold = |c: Option<char>| {
            c.map(|c| {
                if case_insensitive {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
        };
        let next = fold(self.cpt(pos + 1));
        if matches!(next, Some('s' | 't' | 'm' | 'd')) {
            return Some(pos + 2);
        }
        if pos + 2 < self.end {
            let next2 = fold(self.cpt(pos + 2));
            if matches!(
                (next, next2),
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
            ) {
                return Some(pos + 3);
            }
        }
        None
    }

    /// llama.cpp's `unicode_regex_split_custom_gpt2`.
    fn gpt2(&mut self) {
        let mut pos = self.ini;
        while pos < self.end {
            let cpt = self.cpt(pos);
            let is_space = cpt == Some(' ');
            if let Some(end) = self.contraction(pos, false) {
                pos += self.add(end);
                continue;
            }
            let mut flags2 = if is_space {
                self.flags(pos + 1)
            } else {
                self.flags(pos)
            };
            // <space>?\p{L}+
            if flags2.letter {
                pos += usize::from(is_space);
                while flags2.letter {
                    pos += 1;
                    flags2 = self.flags(pos);
                }
                self.add(pos);
                continue;
            }
            // <space>?\p{N}+
            if flags2.number {
                pos += usize::from(is_space);
                while flags2.number {
                    pos += 1;
                    flags2 = self.flags(pos);
                }
                self.add(pos);
                continue;
            }
            // <space>?[^\s\p{L}\p{N}]+
            if !(flags2.space || flags2.letter || flags2.number) && flags2.in_range {
                pos += usize::from(is_space);
                while !(flags2.space || flags2.letter || flags2.number) && flags2.in_range {
                    pos += 1;
                    flags2 = self.flags(pos);
                }
                self.add(pos);
                continue;
            }
            let mut num_ws = 0;
            while self.flags(pos + num_ws).space {
                num_ws += 1;
            }
            // \s+(?!\S)
            if num_ws > 1 && self.cpt(pos + num_ws).is_some() {
                pos += num_ws - 1;
                self.add(pos);
                continue;
            }
            // \s+
            if num_ws > 0 {
                pos += num_ws;
                self.add(pos);
                continue;
            }
            // no match
            pos += 1;
            self.add(pos);
        }
    }

    /// llama.cpp's `unicode_regex_split_custom_llama3` (`single_digits`
    /// false) and `unicode_regex_split_custom_qwen2` (true).
    fn llama3_like(&mut self, single_digits: bool) {
        let mut pos = self.ini;
        while pos < self.end {
            let cpt = self.cpt(pos);
            let flags = self.flags(pos);
            if let Some(end) = self.contraction(pos, true) {
                pos += self.add(end);
                continue;
            }
            let is_cr_lf = |c: Option<char>| matches!(c, Some('\r' | '\n'));
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(is_cr_lf(cpt) || flags.number) && (flags.letter || self.flags(pos + 1).letter) {
                pos += 1;
                while self.flags(pos).letter {
                    pos += 1;
                }
                self.add(pos);
                continue;
            }
            // \p{N}{1,3} or \p{N}
            if flags.number {
                if single_digits {
                    pos += 1;
                    self.add(pos);
                } else {
                    let mut ini = pos;
                    while self.flags(pos).number {
                        pos += 1;
                        if pos - ini >= 3 {
                            self.add(pos);
                            ini = pos;
                        }
                    }
                    self.add(pos);
                }
                continue;
            }
            // <space>?[^\s\p{L}\p{N}]+[\r\n]*
            let is_space = cpt == Some(' ');
            let mut flags2 = if is_space { self.flags(pos + 1) } else { flags };
            if !(flags2.space || flags2.letter || flags2.number) && flags.in_range {
                pos += usize::from(is_space);
                while !(flags2.space || flags2.letter || flags2.number) && flags2.in_range {
                    pos += 1;
                    flags2 = self.flags(pos);
                }
                while is_cr_lf(self.cpt(pos)) {
                    pos += 1;
                }
                self.add(pos);
                continue;
            }
            let mut num_ws = 0;
            let mut last_end_r_or_n = 0;
            while self.flags(pos + num_ws).space {
                if is_cr_lf(self.cpt(pos + num_ws)) {
                    last_end_r_or_n = pos + num_ws + 1;
                }
                num_ws += 1;
            }
            // \s*[\r\n]+
            if last_end_r_or_n > 0 {
                pos = last_end_r_or_n;
                self.add(pos);
                continue;
            }
            // \s+(?!\S)
            if num_ws > 1 && self.cpt(pos + num_ws).is_some() {
                pos += num_ws - 1;
                self.add(pos);
                continue;
            }
            // \s+
            if num_ws > 0 {
                pos += num_ws;
                self.add(pos);
                continue;
            }
            // no match
            pos += 1;
            self.add(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pre: PreTokenizer, text: &str) -> Vec<String> {
        let cpts: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        let mut start = 0;
        for len in split(pre, &cpts) {
            out.push(cpts[start..start + len].iter().collect());
            start += len;
        }
        assert_eq!(start, cpts.len());
        out
    }

    #[test]
    fn gpt2_rules() {
        use PreTokenizer::Gpt2;
        assert_eq!(pieces(Gpt2, "Hello world"), ["Hello", " world"]);
        // \s+(?!\S): the last space of a run goes with the next word.
        assert_eq!(pieces(Gpt2, "a   b"), ["a", "  ", " b"]);
        // At the end of text the whole run stays together.
        assert_eq!(pieces(Gpt2, "a   "), ["a", "   "]);
        assert_eq!(pieces(Gpt2, "\n\nHi"), ["\n", "\n", "Hi"]);
        assert_eq!(pieces(Gpt2, "\t x"), ["\t", " x"]);
        assert_eq!(
            pieces(Gpt2, "it's we're I'LL"),
            ["it", "'s", " we", "'re", " I", "'", "LL"]
        );
        assert_eq!(
            pieces(Gpt2, "x=1234;  y"),
            ["x", "=", "1234", ";", " ", " y"]
        );
        assert_eq!(pieces(Gpt2, " ?!"), [" ?!"]);
        assert_eq!(pieces(Gpt2, "café naïve"), ["café", " naïve"]);
        assert_eq!(pieces(Gpt2, ""), Vec::<String>::new());
    }

    #[test]
    fn smollm_splits_digits_first() {
        use PreTokenizer::DigitsGpt2;
        assert_eq!(
            pieces(DigitsGpt2, "abc 123def"),
            ["abc", " ", "1", "2", "3", "def"]
        );
        // Piece ends act as end of text for the GPT-2 rules.
        assert_eq!(pieces(DigitsGpt2, "a  1"), ["a", "  ", "1"]);
    }

    #[test]
    fn llama3_rules() {
        use PreTokenizer::Llama3;
        assert_eq!(
            pieces(Llama3, "I'M 12345 ok\n\n  x"),
            ["I", "'M", " ", "123", "45", " ok", "\n\n", " ", " x"]
        );
        assert_eq!(
            pieces(Llama3, "foo.bar(\"x\")\n"),
            ["foo", ".bar", "(\"", "x", "\")\n"]
        );
        assert_eq!(pieces(Llama3, "  \n  a"), ["  \n", " ", " a"]);
    }

    #[test]
    fn qwen2_rules() {
        assert_eq!(
            pieces(PreTokenizer::Qwen2, "x 2024!"),
            ["x", " ", "2", "0", "2", "4", "!"]
        );
    }

    #[test]
    fn default_rules() {
        use PreTokenizer::Default;
        assert_eq!(
            pieces(Default, "a+b 12345"),
            ["a", "+", "b", " ", "123", "45"]
        );
        assert_eq!(pieces(Default, "hi!! there"), ["hi", "!!", " there"]);
    }

    #[test]
    fn names() {
        assert_eq!(
            PreConfig::from_name("smollm").map(|c| c.pre),
            Some(PreTokenizer::DigitsGpt2)
        );
        assert_eq!(
            PreConfig::from_name("llama-bpe").map(|c| c.ignore_merges),
            Some(true)
        );
        assert_eq!(PreConfig::from_name("nope"), None);
    }
}
