//! Hand-written pre-tokenizers: the regular expressions of GPT-2, LLaMA-3 and Qwen2 as
//! Hugging Face `tokenizers` applies them (Oniguruma, leftmost alternative first),
//! written as small matchers so the device needs no regex engine. The character
//! classes come from [`super::unicode_tables`], measured on `tokenizers` itself.
//!
//! Each matcher returns the byte length of the piece at the start of a non-empty string.

use super::PreTokenizer;
use super::unicode_tables::{LETTER, NUMBER, NUMERIC, SPACE};

fn in_table(t: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    t.binary_search_by(|&(a, b)| {
        if b < c {
            core::cmp::Ordering::Less
        } else if a > c {
            core::cmp::Ordering::Greater
        } else {
            core::cmp::Ordering::Equal
        }
    })
    .is_ok()
}

/// `\p{L}`.
pub fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    in_table(LETTER, c)
}

/// `\p{N}`.
pub fn is_number(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    in_table(NUMBER, c)
}

/// What Hugging Face's `Digits` pre-tokenizer isolates.
pub fn is_numeric(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    in_table(NUMERIC, c)
}

/// `\s`.
pub fn is_space(c: char) -> bool {
    if c.is_ascii() {
        return matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r');
    }
    in_table(SPACE, c)
}

/// `[^\s\p{L}\p{N}]`.
fn is_other(c: char) -> bool {
    !is_space(c) && !is_letter(c) && !is_number(c)
}

/// `[\r\n]`.
fn is_newline(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// End (byte offset) of the run of chars satisfying `f` that starts at byte `from`.
fn run(s: &str, from: usize, f: impl Fn(char) -> bool) -> usize {
    s[from..]
        .char_indices()
        .find(|&(_, c)| !f(c))
        .map_or(s.len(), |(i, _)| from + i)
}

/// The second char of `s` and its byte offset.
fn second(s: &str) -> Option<(usize, char)> {
    let mut it = s.char_indices();
    it.next();
    it.next()
}

/// `\s+(?!\S)|\s+` at the start of `s` (which starts with whitespace): the run of
/// whitespace, minus its last char when something other than whitespace follows and
/// the run is longer than one char (that last char then leads the next piece).
fn trailing_space(s: &str) -> usize {
    let end = run(s, 0, is_space);
    if end == s.len() {
        return end;
    }
    match s[..end].char_indices().last() {
        Some((last, _)) if last > 0 => last,
        _ => end,
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d` at the start of `s`; `case_insensitive` is `(?i:...)`,
/// under which Oniguruma also takes `ſ` (U+017F, case-folded to `s`) for `s`.
fn contraction(s: &str, case_insensitive: bool) -> Option<usize> {
    let rest = s.strip_prefix('\'')?;
    if case_insensitive && rest.starts_with('\u{17F}') {
        return Some(1 + '\u{17F}'.len_utf8());
    }
    ["s", "t", "re", "ve", "m", "ll", "d"].iter().find_map(|c| {
        let head = rest.get(..c.len())?;
        let ok = if case_insensitive {
            head.eq_ignore_ascii_case(c)
        } else {
            head == *c
        };
        ok.then_some(1 + c.len())
    })
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
pub fn gpt2(s: &str) -> usize {
    if let Some(n) = contraction(s, false) {
        return n;
    }
    let Some(c0) = s.chars().next() else { return 0 };
    let (start, c) = match (c0, second(s)) {
        (' ', Some((i, c))) if !is_space(c) => (i, c),
        _ => (0, c0),
    };
    if is_letter(c) {
        run(s, start, is_letter)
    } else if is_number(c) {
        run(s, start, is_number)
    } else if is_other(c) {
        run(s, start, is_other)
    } else {
        trailing_space(s)
    }
}

/// LLaMA-3 (`digits_max` 3) and Qwen2 (`digits_max` 1):
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// (Qwen2's has `\p{N}` for `\p{N}{1,3}`).
pub fn llama3(s: &str, digits_max: usize) -> usize {
    if let Some(n) = contraction(s, true) {
        return n;
    }
    let Some(c0) = s.chars().next() else { return 0 };
    if is_letter(c0) {
        return run(s, 0, is_letter);
    }
    if !is_newline(c0)
        && !is_number(c0)
        && let Some((i, c)) = second(s)
        && is_letter(c)
    {
        return run(s, i, is_letter);
    }
    if is_number(c0) {
        return s
            .char_indices()
            .take(digits_max)
            .take_while(|&(_, c)| is_number(c))
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
    }
    let start = match (c0, second(s)) {
        (' ', Some((i, c))) if is_other(c) => i,
        _ => 0,
    };
    if s[start..].chars().next().is_some_and(is_other) {
        let e = run(s, start, is_other);
        return run(s, e, is_newline);
    }
    // c0 is whitespace here: `\s*[\r\n]+` takes the run up to its last newline.
    let end = run(s, 0, is_space);
    if let Some((i, c)) = s[..end].char_indices().rfind(|&(_, c)| is_newline(c)) {
        return i + c.len_utf8();
    }
    trailing_space(s)
}

/// Splits `s` into pieces with `matcher`, calling `f` on each.
fn split_with<'a>(s: &'a str, matcher: impl Fn(&str) -> usize, f: &mut impl FnMut(&'a str)) {
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        // A matcher always takes at least one char; the guard keeps the loop finite.
        let n = matcher(rest).max(c.len_utf8());
        f(&rest[..n]);
        rest = &rest[n..];
    }
}

/// Splits `s` into the pieces of pre-tokenizer `pre`, calling `f` on each (in order;
/// they cover `s`). [`PreTokenizer::None`] gives `s` whole and
/// [`PreTokenizer::SplitSpaces`] cuts before every `▁`.
pub fn split<'a>(pre: PreTokenizer, s: &'a str, mut f: impl FnMut(&'a str)) {
    match pre {
        PreTokenizer::None => {
            if !s.is_empty() {
                f(s)
            }
        }
        PreTokenizer::SplitSpaces => {
            let mut start = 0;
            for (i, _) in s.match_indices('\u{2581}') {
                if i > start {
                    f(&s[start..i]);
                    start = i;
                }
            }
            if start < s.len() {
                f(&s[start..]);
            }
        }
        PreTokenizer::Gpt2 => split_with(s, gpt2, &mut f),
        PreTokenizer::Llama3 => split_with(s, |s| llama3(s, 3), &mut f),
        PreTokenizer::Qwen2 => split_with(s, |s| llama3(s, 1), &mut f),
        PreTokenizer::SmolLm => {
            // `Digits(individual_digits)`: every numeric char alone, then GPT-2's
            // expression on each stretch between them.
            let mut start = 0;
            for (i, c) in s.char_indices() {
                if is_numeric(c) {
                    split_with(&s[start..i], gpt2, &mut f);
                    f(&s[i..i + c.len_utf8()]);
                    start = i + c.len_utf8();
                }
            }
            split_with(&s[start..], gpt2, &mut f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn pieces(pre: PreTokenizer, s: &str) -> Vec<&str> {
        let mut v = Vec::new();
        split(pre, s, |p| v.push(p));
        assert_eq!(v.concat(), s);
        v
    }

    #[test]
    fn gpt2_pattern_cases() {
        // Expected splits as Hugging Face `tokenizers` gives for the GPT-2 pattern.
        let g = |s| pieces(PreTokenizer::Gpt2, s);
        assert_eq!(g("Hello world"), ["Hello", " world"]);
        assert_eq!(
            g("I'm  here\n\nnow "),
            ["I", "'m", " ", " here", "\n", "\n", "now", " "]
        );
        assert_eq!(g(" 2012, ok!!"), [" 2012", ",", " ok", "!!"]);
        assert_eq!(g("a\n b"), ["a", "\n", " b"]);
        assert_eq!(g("'hello 'S"), ["'", "hello", " '", "S"]);
        assert_eq!(g("café 東京"), ["café", " 東京"]);
        assert_eq!(
            g("x\u{a0}y  \u{3000}z"),
            ["x", "\u{a0}", "y", "  ", "\u{3000}", "z"]
        );
    }

    #[test]
    fn smollm_isolates_digits() {
        let s = |s| pieces(PreTokenizer::SmolLm, s);
        assert_eq!(s(" 2012, x"), [" ", "2", "0", "1", "2", ",", " x"]);
        assert_eq!(s("a½b ၁၂"), ["a", "½", "b", " ", "၁", "၂"]);
    }

    #[test]
    fn llama3_pattern_cases() {
        let l = |s| pieces(PreTokenizer::Llama3, s);
        let q = |s| pieces(PreTokenizer::Qwen2, s);
        assert_eq!(l("Hello world"), ["Hello", " world"]);
        assert_eq!(l("12345 I'M"), ["123", "45", " I", "'M"]);
        assert_eq!(l("a.\n\n  b"), ["a", ".\n\n", " ", " b"]);
        assert_eq!(q("x  \n y"), ["x", "  \n", " y"]);
        assert_eq!(q("(a)"), ["(a", ")"]);
        assert_eq!(q("12"), ["1", "2"]);
        assert_eq!(l("it'ſ"), ["it", "'ſ"]);
    }

    #[test]
    fn split_spaces_cuts_before_each_space_mark() {
        let m = |s| pieces(PreTokenizer::SplitSpaces, s);
        assert_eq!(m("▁a▁▁b"), ["▁a", "▁", "▁b"]);
        assert_eq!(m("a▁b"), ["a", "▁b"]);
        assert_eq!(m(""), [""; 0]);
    }
}
