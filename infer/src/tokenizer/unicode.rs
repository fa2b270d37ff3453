//! Unicode helpers for the pre-tokenizers: the general-category classes the
//! GPT-2 style split rules need (`\p{L}`, `\p{N}`, `\p{P}`, `\s`) and the
//! GPT-2 byte-to-unicode alphabet used by byte-level BPE.
//!
//! The category table is generated from Unicode 15.1, the version of
//! llama.cpp's `unicode-data.cpp`, so `\p{L}` and `\p{N}` agree with llama.cpp
//! code point for code point. White space is the Unicode `White_Space`
//! property, the same 25 code points llama.cpp lists (this is exactly what
//! `char::is_whitespace` tests).

use super::unicode_tables::CATEGORY_RANGES;

/// The general-category classes the pre-tokenizers distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Category {
    /// `\p{L}`: Lu, Ll, Lt, Lm, Lo.
    Letter,
    /// `\p{N}`: Nd, Nl, No.
    Number,
    /// `\p{P}`: Pc, Pd, Ps, Pe, Pi, Pf, Po.
    Punctuation,
    /// Anything else (marks, symbols, separators, controls, unassigned).
    Other,
}

/// The general-category class of `c`.
pub(crate) fn category(c: char) -> Category {
    let cp = u32::from(c);
    if cp < 0x80 {
        let b = cp as u8;
        return if b.is_ascii_alphabetic() {
            Category::Letter
        } else if b.is_ascii_digit() {
            Category::Number
        } else if b.is_ascii_punctuation() && !b"$+<=>^`|~".contains(&b) {
            Category::Punctuation
        } else {
            Category::Other
        };
    }
    match CATEGORY_RANGES.binary_search_by(|&(first, last, _)| {
        if last < cp {
            std::cmp::Ordering::Less
        } else if first > cp {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(i) => CATEGORY_RANGES.get(i).map_or(Category::Other, |r| r.2),
        Err(_) => Category::Other,
    }
}

/// `\p{L}`.
pub(crate) fn is_letter(c: char) -> bool {
    category(c) == Category::Letter
}

/// `\p{N}`.
pub(crate) fn is_number(c: char) -> bool {
    category(c) == Category::Number
}

/// `\p{P}`.
pub(crate) fn is_punctuation(c: char) -> bool {
    category(c) == Category::Punctuation
}

/// `\s`: the Unicode `White_Space` property.
pub(crate) fn is_whitespace(c: char) -> bool {
    c.is_whitespace()
}

/// Is `b` one of the bytes GPT-2's alphabet maps to itself (printable
/// Latin-1 other than space and soft hyphen)?
fn maps_to_itself(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The GPT-2 byte-level alphabet: byte `b` is written as code point
/// `BYTE_TO_CHAR[b]` (printable Latin-1 bytes as themselves, the 68 others as
/// U+0100 + their rank among them).
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    for (b, slot) in (0u8..=255).zip(table.iter_mut()) {
        let cp = if maps_to_itself(b) {
            u32::from(b)
        } else {
            let cp = next;
            next += 1;
            cp
        };
        *slot = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// The inverse of [`byte_to_char_table`]: the byte a GPT-2 alphabet code point
/// stands for, if any.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    if cp < 0x100 {
        let b = cp as u8;
        return maps_to_itself(b).then_some(b);
    }
    // Code points U+0100.. stand for the 68 other bytes in order:
    // 0x00..=0x20, 0x7F..=0xA0, then 0xAD.
    match cp - 0x100 {
        r @ 0..=32 => u8::try_from(r).ok(),
        r @ 33..=66 => u8::try_from(0x7F + (r - 33)).ok(),
        67 => Some(0xAD),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories() {
        assert!(is_letter('a') && is_letter('Z') && is_letter('é') && is_letter('ж'));
        assert!(is_letter('中') && is_letter('ß') && is_letter('ª'));
        // Combining marks are not letters (Rust's is_alphabetic says they are).
        assert!(!is_letter('\u{0301}') && '\u{0903}'.is_alphabetic() && !is_letter('\u{0903}'));
        assert!(is_number('7') && is_number('٣') && is_number('Ⅻ') && is_number('½'));
        assert!(!is_number('a') && !is_letter('1'));
        assert!(is_punctuation('!') && is_punctuation('«') && is_punctuation('。'));
        assert!(!is_punctuation('$') && !is_punctuation('+') && !is_punctuation('`'));
        assert_eq!(category('😀'), Category::Other);
        assert!(is_whitespace('\u{3000}') && is_whitespace('\u{85}') && !is_whitespace('\u{200B}'));
    }

    #[test]
    fn gpt2_alphabet_round_trips() {
        let table = byte_to_char_table();
        assert_eq!(table[usize::from(b' ')], 'Ġ');
        assert_eq!(table[usize::from(b'\n')], 'Ċ');
        assert_eq!(table[usize::from(b'a')], 'a');
        assert_eq!(table[0xAD], '\u{0143}');
        for (b, &c) in table.iter().enumerate() {
            assert_eq!(char_to_byte(c).map(usize::from), Some(b));
        }
        assert_eq!(char_to_byte('\u{0144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }
}
