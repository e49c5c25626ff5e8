//! Hand-written pre-tokenizers: the regular expressions of GPT-2, LLaMA-3 and Qwen2
//! (as Hugging Face `tokenizers` and llama.cpp apply them), written as small matchers
//! so the device needs no regex engine. Each matcher returns the byte length of the
//! piece at the start of a non-empty string.

use super::unicode_tables::{LETTER, NUMBER};

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

/// `\s` (the Unicode `White_Space` property, as Oniguruma's `\s`).
pub fn is_space(c: char) -> bool {
    c.is_whitespace()
}

fn is_other(c: char) -> bool {
    !is_space(c) && !is_letter(c) && !is_number(c)
}

/// Byte length of the run of chars satisfying `f` starting at byte `from`.
fn run(s: &str, from: usize, f: impl Fn(char) -> bool) -> usize {
    s[from..]
        .char_indices()
        .find(|&(_, c)| !f(c))
        .map_or(s.len(), |(i, _)| from + i)
}

fn second(s: &str) -> Option<(usize, char)> {
    let mut it = s.char_indices();
    it.next();
    it.next()
}

/// `\s+(?!\S)|\s+` at the start of `s` (which starts with whitespace): a run of
/// whitespace, minus its last char when a non-space follows and the run is longer
/// than one char (that char then leads the next word).
fn trailing_space(s: &str) -> usize {
    let end = run(s, 0, is_space);
    if end == s.len() {
        return end;
    }
    let last = s[..end].char_indices().last().map_or(0, |(i, _)| i);
    if last > 0 { last } else { end }
}

const CONTRACTIONS: [&str; 7] = ["s", "t", "re", "ve", "m", "ll", "d"];

fn contraction(s: &str, case_insensitive: bool) -> Option<usize> {
    let rest = s.strip_prefix('\'')?;
    CONTRACTIONS.iter().find_map(|c| {
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
    let c0 = s.chars().next().unwrap_or(' ');
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
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
pub fn llama3(s: &str, digits_max: usize) -> usize {
    if let Some(n) = contraction(s, true) {
        return n;
    }
    let c0 = s.chars().next().unwrap_or(' ');
    let nl = |c: char| c == '\r' || c == '\n';
    if is_letter(c0) {
        return run(s, 0, is_letter);
    }
    if !nl(c0)
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
        return run(s, e, nl);
    }
    // c0 is whitespace here.
    let end = run(s, 0, is_space);
    if let Some((i, c)) = s[..end].char_indices().rfind(|&(_, c)| nl(c)) {
        return i + c.len_utf8();
    }
    trailing_space(s)
}

/// Splits `s` into pieces with `matcher`, calling `f` on each.
pub fn split(s: &str, matcher: impl Fn(&str) -> usize, mut f: impl FnMut(&str)) {
    let mut rest = s;
    while !rest.is_empty() {
        let n = matcher(rest).max(rest.chars().next().map_or(1, char::len_utf8));
        f(&rest[..n]);
        rest = &rest[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn pieces(s: &str, m: impl Fn(&str) -> usize) -> Vec<&str> {
        let mut v = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let n = m(rest);
            v.push(&rest[..n]);
            rest = &rest[n..];
        }
        v
    }

    #[test]
    fn gpt2_pattern_cases() {
        // Expected splits as the `regex` module gives for the GPT-2 pattern.
        assert_eq!(pieces("Hello world", gpt2), ["Hello", " world"]);
        assert_eq!(
            pieces("I'm  here\n\nnow ", gpt2),
            ["I", "'m", " ", " here", "\n", "\n", "now", " "]
        );
        assert_eq!(pieces(" 2012, ok!!", gpt2), [" 2012", ",", " ok", "!!"]);
        assert_eq!(pieces("a\n b", gpt2), ["a", "\n", " b"]);
        assert_eq!(pieces("'hello 'S", gpt2), ["'", "hello", " '", "S"]);
        assert_eq!(pieces("café 東京", gpt2), ["café", " 東京"]);
    }

    #[test]
    fn llama3_pattern_cases() {
        assert_eq!(pieces("Hello world", |s| llama3(s, 3)), ["Hello", " world"]);
        assert_eq!(
            pieces("12345 I'M", |s| llama3(s, 3)),
            ["123", "45", " I", "'M"]
        );
        assert_eq!(
            pieces("a.\n\n  b", |s| llama3(s, 3)),
            ["a", ".\n\n", " ", " b"]
        );
        assert_eq!(pieces("x  \n y", |s| llama3(s, 1)), ["x", "  \n", " y"]);
        assert_eq!(pieces("(a)", |s| llama3(s, 1)), ["(a", ")"]);
    }
}
