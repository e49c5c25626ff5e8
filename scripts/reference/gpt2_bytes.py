"""GPT-2's bytes_to_unicode: the character a byte-level BPE vocabulary uses for each
byte (printable Latin-1 bytes stand for themselves, the others are shifted past 255).
Shared by the tiny-model and tokenizer reference scripts."""


def bytes_to_unicode():
    """The dict byte (0..255) -> one-character string."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
