//! Generated tokens to text as they stream: incremental detokenization (multi-byte characters
//! split over tokens wait for their last byte), end-of-generation tokens dropped, and stop
//! sequences cut out, holding back any tail that might still become one.

use hashgrid_infer::TextModel;
use hashgrid_infer::tokenizer::StreamDecoder;

/// Turns a growing token list into text deltas.
pub(crate) struct TextStream<'a> {
    model: &'a TextModel,
    dec: StreamDecoder<'a>,
    /// Every generated token taken so far (end-of-generation ones included).
    tokens: Vec<u32>,
    /// The visible text so far (cut at a stop sequence once one is found).
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
    stop: Vec<String>,
    /// A stop sequence was found: nothing more is handed out.
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub(crate) fn new(model: &'a TextModel, stop: Vec<String>) -> TextStream<'a> {
        TextStream {
            model,
            dec: StreamDecoder::new(&model.tokenizer, true),
            tokens: Vec::new(),
            text: String::new(),
            sent: 0,
            stop,
            stopped: false,
        }
    }

    /// The generated tokens taken so far.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Whether a stop sequence ended the text.
    pub(crate) fn hit_stop(&self) -> bool {
        self.stopped
    }

    /// The whole text (what a non-streamed response returns).
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Takes `all` (every generated token so far, a continuation of what was taken before)
    /// and returns the text that may be shown now. `None` when `all` is not a continuation:
    /// the caller decides what that means (a provider that rewrote its stream).
    pub(crate) fn push(&mut self, all: &[u32]) -> Option<String> {
        if !all.starts_with(&self.tokens) {
            return None;
        }
        for &t in &all[self.tokens.len()..] {
            self.tokens.push(t);
            if !self.stopped && !self.model.eog.contains(&t) {
                let piece = self.dec.push(t);
                self.text.push_str(&piece);
            }
        }
        Some(self.emit(false))
    }

    /// The end of the generation: flushes the decoder and returns the rest of the text.
    pub(crate) fn finish(&mut self) -> String {
        if !self.stopped {
            let tail = self.dec.finish();
            self.text.push_str(&tail);
        }
        self.emit(true)
    }

    fn emit(&mut self, last: bool) -> String {
        if self.stopped {
            return String::new();
        }
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        // A stop sequence may start up to `longest - 1` bytes before what was already sent.
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = found {
            // `at >= sent`: an earlier match would have been found at an earlier call.
            let at = at.max(self.sent);
            self.text.truncate(at);
            self.stopped = true;
            let out = self.text[self.sent..].to_string();
            self.sent = self.text.len();
            return out;
        }
        let mut upto = self.text.len();
        if !last {
            // Hold back a tail that is the start of a stop sequence.
            let hold = self
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .rev()
                        .filter(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
                        .take(1)
                })
                .max()
                .unwrap_or(0);
            upto = upto.saturating_sub(hold).max(self.sent);
        }
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }
}
