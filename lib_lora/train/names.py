"""Which LoRA names make files that every host can hold: `<name>.safetensors`, `<name>-000004.safetensors`.

A name must be one file name on Linux, macOS and Windows (a LoRA is shared between them), so the
strictest rules apply: Windows' forbidden characters and device names (`CON`, `con.txt` and
`CON.tar.gz` all open the console device, whatever the extension), no trailing dot or space (Windows
drops them, so the file would get another name), and room for the longest suffix we add within the
255 bytes a file name may have.
"""

FORBIDDEN_CHARACTERS = '/\\:*?"<>|'
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))})
# 255 bytes per file name, less what the longest file we write adds: ".<name>-step00000500.safetensors.<pid>.tmp"
MAX_NAME_BYTES = 200
ALLOWED = (f"a name may use letters of any script, digits, spaces and punctuation except {' '.join(FORBIDDEN_CHARACTERS)} "
           f"and control characters; it may not be . or .., end in a dot or space, be a Windows device name "
           f"(CON, PRN, AUX, NUL, COM1-9, LPT1-9, with or without an extension) or exceed {MAX_NAME_BYTES} bytes in UTF-8")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a LoRA file's name stem, or None when it can."""
    if not name.strip():
        return "is empty"
    forbidden = sorted({ch for ch in name if ch in FORBIDDEN_CHARACTERS})
    if forbidden:
        return f"contains {' '.join(forbidden)}"
    control = next((ch for ch in name if ord(ch) < 32 or ord(ch) == 127), None)
    if control is not None:
        return f"contains the control character {control!r}"
    if name in (".", ".."):
        return "names a folder, not a file"
    if name[-1] in ". " or name[0] == " ":
        return "starts with a space or ends with a dot or space (Windows drops them, so the file would get another name)"
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        return "is a Windows device name"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is {len(name.encode('utf-8'))} bytes long in UTF-8"
    return None
