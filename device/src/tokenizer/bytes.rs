//! GPT-2's byte ↔ printable-char map (`bytes_to_unicode` in GPT-2's `encoder.py`):
//! byte-level BPE vocabularies spell every byte as one printable char, so that
//! `"Ġthe"` stands for the bytes `b" the"`.

/// Whether byte `b` stands for itself (printable Latin-1, minus the soft hyphen).
const fn is_direct(b: u8) -> bool {
    (b >= b'!' && b <= b'~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE
}

const fn build_byte_char() -> [char; 256] {
    let mut t = ['\0'; 256];
    // Bytes that are not printable map, in order, to U+0100, U+0101, ...
    let mut next = 256u32;
    let mut b = 0usize;
    while b < 256 {
        let c = if is_direct(b as u8) {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        t[b] = match char::from_u32(c) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    t
}

/// The printable char standing for each byte.
const BYTE_CHAR: [char; 256] = build_byte_char();

/// One past the largest char in [`BYTE_CHAR`] (U+0143).
const CHAR_LIMIT: usize = 0x144;

const fn build_char_byte() -> [i16; CHAR_LIMIT] {
    let mut t = [-1i16; CHAR_LIMIT];
    let mut b = 0usize;
    while b < 256 {
        t[BYTE_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    t
}

/// The byte each printable char stands for, or -1.
const CHAR_BYTE: [i16; CHAR_LIMIT] = build_char_byte();

/// GPT-2's printable char for byte `b`.
pub fn byte_char(b: u8) -> char {
    BYTE_CHAR[b as usize]
}

/// The byte GPT-2's printable char `c` stands for, if it is one.
pub fn char_byte(c: char) -> Option<u8> {
    match CHAR_BYTE.get(c as usize) {
        Some(&b) if b >= 0 => Some(b as u8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_gpt2_table() {
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(0), 'Ā');
        assert_eq!(byte_char(0xAD), 'Ń');
        assert_eq!(byte_char(0x7F), 'ġ');
        for b in 0..=255u8 {
            assert_eq!(char_byte(byte_char(b)), Some(b));
        }
        assert_eq!(char_byte('€'), None);
        assert_eq!(char_byte('\0'), None);
    }
}
