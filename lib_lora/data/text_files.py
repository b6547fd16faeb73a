"""Caption files in whatever encoding the tool that wrote them used: decoded, or refused by name.

kohya reads captions as UTF-8 only, so one caption saved by a Windows tool stops a whole run. We
read, in this order, and say which encoding was assumed whenever it is not UTF-8:

1. A byte-order mark decides: UTF-8 (`utf-8-sig`), UTF-32 and UTF-16 (what Windows Notepad's
   "Unicode" writes). UTF-32's mark is checked first: it begins with UTF-16 LE's.
2. Strict UTF-8. Legacy double-byte text almost never decodes as UTF-8 by accident (its bytes do
   not form UTF-8's lead/continuation patterns), so UTF-8 wins whenever it fits.
3. UTF-16 without a mark, told by its NUL bytes: text with ASCII in it (tags, commas, spaces) has a
   zero high byte in most code units, on the odd bytes for little-endian, on the even ones for big.
   UTF-16 with neither a mark nor any ASCII character is not recognised (no Windows tool writes it).
4. The legacy Windows code pages GBK (cp936, Simplified Chinese), Shift-JIS (cp932, Japanese) and
   cp1252 (Western European). They overlap: cp1252 decodes almost any bytes, GBK decodes most
   Shift-JIS, Shift-JIS reads GBK as half-width katakana, and both read some accented Latin words
   as CJK ("Crème" as "Cr鑪e"). So: text whose every non-ASCII byte reads in cp1252 as a letter
   beside a Latin letter, or as a typographic mark (“ ” – … €), is cp1252, since CJK text has
   its non-ASCII bytes in pairs. Otherwise each code page that decodes is scored per non-ASCII byte
   by how plausible its characters are: GBK's GB2312 characters (the common ones), Shift-JIS's kana,
   kanji and full-width punctuation, cp1252's accented letters beside a Latin letter and its marks.
   The highest score wins; on a tie cp1252 (the code page of most Windows installs), then GBK
   (more Chinese than Japanese users share captions from such tools), then Shift-JIS. A caption
   of one CJK character can be valid UTF-8 by chance (GBK's 猫 is UTF-8's è): it is read as UTF-8.

Text with control characters other than tab, CR and LF, in every reading, is not a caption: the
error names the file and asks for UTF-8.
"""
from __future__ import annotations

import codecs
import unicodedata
from pathlib import Path

from .errors import DatasetError

BOMS = (  # longest first: UTF-32 LE's mark starts with UTF-16 LE's
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8 with BOM"),
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32 (BOM)"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32 (BOM)"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16 (BOM)"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16 (BOM)"),
)
LEGACY = (("cp1252", "cp1252 (Western European Windows)"), ("gbk", "GBK (Simplified Chinese Windows)"),
          ("cp932", "Shift-JIS (cp932, Japanese Windows)"))  # in the order that wins a tie
NUL_SHARE = 0.25  # UTF-16 without BOM: at least this share of code units has a NUL in one position
ALLOWED_CONTROLS = frozenset("\t\n\r")
CP1252_MARKS = frozenset("‘’‚“”„–—…•€™°«»¡¿·×÷±§©®²³½¼¾\u00a0")
NAMES = "UTF-8, UTF-16, UTF-32, GBK, Shift-JIS or cp1252"


def read_text(path: Path) -> tuple[str, str | None]:
    """The file's text and, when it is not plain UTF-8, the encoding assumed (a label for a warning)."""
    data = Path(path).read_bytes()
    text, label = decode_text(data)
    if text is None:
        raise DatasetError(f"caption {path} is not text in any encoding we read ({NAMES}): re-save it as UTF-8")
    return text, label


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """(text, label of the encoding, None for UTF-8), or (None, None) when no encoding gives text."""
    for bom, codec, label in BOMS:
        if data.startswith(bom):
            text = _strict(data, codec)
            return (text, None if codec == "utf-8-sig" else label) if text is not None else (None, None)
    text = _strict(data, "utf-8")
    if text is not None:
        return text, None
    codec = _utf16_by_nuls(data)
    if codec is not None and (text := _strict(data, codec)) is not None:
        return text, f"UTF-16 {codec[-2:].upper()} (no BOM)"
    return _best_legacy(data)


def _strict(data: bytes, codec: str) -> str | None:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return None
    return None if any(unicodedata.category(ch) == "Cc" and ch not in ALLOWED_CONTROLS for ch in text) else text


def _utf16_by_nuls(data: bytes) -> str | None:
    units = len(data) // 2
    if not units or len(data) % 2:
        return None
    nul_even, nul_odd = data[0::2].count(0), data[1::2].count(0)
    if nul_odd >= NUL_SHARE * units and nul_even < nul_odd / 4:
        return "utf-16-le"
    if nul_even >= NUL_SHARE * units and nul_odd < nul_even / 4:
        return "utf-16-be"
    return None


def _best_legacy(data: bytes) -> tuple[str | None, str | None]:
    western = _strict(data, "cp1252")
    if western is not None and _plausibility(western, "cp1252") == sum(ord(ch) >= 0x80 for ch in western):
        return western, LEGACY[0][1]  # every non-ASCII byte a letter in a Latin word or a mark
    high = sum(b >= 0x80 for b in data)
    best, best_score = (None, None), -1.0
    for codec, label in LEGACY:
        text = _strict(data, codec)
        if text is not None and (score := _plausibility(text, codec) / high) > best_score:
            best, best_score = (text, label), score
    return best


def _plausibility(text: str, codec: str) -> int:
    """Points for characters that real text in `codec` has (at best 1 per non-ASCII byte)."""
    points = 0
    for i, ch in enumerate(text):
        if ord(ch) < 0x80:
            continue
        if codec == "cp1252":
            beside_latin = _latin(text[i - 1 : i]) or _latin(text[i + 1 : i + 2])
            points += (ch.isalpha() and ch not in "ƒªº" and beside_latin) or ch in CP1252_MARKS
        elif codec == "gbk":
            points += 2 * _encodes(ch, "gb2312")
        else:
            points += 2 * _japanese(ch)
    return points


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalpha()


def _encodes(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _japanese(ch: str) -> bool:
    """Kana, kanji and full-width punctuation (not half-width katakana, Shift-JIS's reading of GBK)."""
    code = ord(ch)
    return 0x3000 <= code <= 0x30FF or 0x4E00 <= code <= 0x9FFF or 0xFF01 <= code <= 0xFF60
