"""A line/points chart written straight to PNG (zlib + struct; no matplotlib): axes, ticks with
numbers, labelled points, axis titles in a 3x5 pixel font."""

from __future__ import annotations

import math
import struct
import zlib

__all__ = ["write_png", "line_chart"]

# 3x5 glyphs: five rows of three bits (4 = left pixel), one octal digit per row.
_FONT = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717", "6": "74757",
    "7": "71111", "8": "75757", "9": "75717", ".": "00002", "-": "00700", "/": "11244", "=": "07070",
    " ": "00000", "(": "24442", ")": "42224", ",": "00024", ":": "02020",
    "A": "25755", "B": "65656", "C": "34443", "D": "65556", "E": "74647", "F": "74644", "G": "34553",
    "H": "55755", "I": "72227", "J": "11152", "K": "55655", "L": "44447", "M": "57755", "N": "65555",
    "O": "25552", "P": "65644", "Q": "25563", "R": "65655", "S": "34716", "T": "72222", "U": "55557",
    "V": "55552", "W": "55575", "X": "55255", "Y": "55222", "Z": "71247",
}
_BLACK, _GREY, _BLUE, _WHITE = (0, 0, 0), (215, 215, 215), (31, 91, 180), (255, 255, 255)


def write_png(path: str, width: int, height: int, rgb: bytes | bytearray) -> None:
    """Write 8-bit RGB pixels (rows top to bottom) as a PNG file."""
    if len(rgb) != width * height * 3:
        raise ValueError("pixel buffer does not match width x height x 3")
    raw = b"".join(b"\x00" + bytes(rgb[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(_WHITE * (width * height))

    def dot(self, x: int, y: int, color: tuple[int, int, int], r: int = 0) -> None:
        for yy in range(y - r, y + r + 1):
            for xx in range(x - r, x + r + 1):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], r: int = 0) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * s / steps), round(y0 + (y1 - y0) * s / steps), color, r)

    def text(self, x: int, y: int, s: str, scale: int = 2, color=_BLACK, anchor: str = "left") -> None:
        """Draw `s` with its top at y; anchor left, center or right of x."""
        width = len(s) * 4 * scale - scale
        x -= {"left": 0, "center": width // 2, "right": width}[anchor]
        for k, ch in enumerate(s.upper()):
            for row, bits in enumerate(_FONT.get(ch, _FONT[" "])):
                for col in range(3):
                    if int(bits) & (4 >> col):
                        for dy in range(scale):
                            for dx in range(scale):
                                self.dot(x + (k * 4 + col) * scale + dx, y + row * scale + dy, color)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.3g}"


def line_chart(path: str, xs: list[float], ys: list[float], labels: list[str] | None = None, *,
               title: str = "", x_label: str = "", y_label: str = "", width: int = 640, height: int = 440) -> None:
    """Points (xs[i], ys[i]) joined in order, each labelled labels[i], written to `path` as PNG."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("line_chart needs as many x as y values, at least one")
    c = _Canvas(width, height)
    left, right, top, bottom = 70, width - 30, 40, height - 60
    xt, yt = _ticks(min(0.0, min(xs)), max(xs) * 1.05), _ticks(min(0.0, min(ys)), max(ys) * 1.1)

    def sx(v: float) -> int:
        return round(left + (v - xt[0]) / (xt[-1] - xt[0]) * (right - left))

    def sy(v: float) -> int:
        return round(bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (bottom - top))

    for v in xt:
        c.line(sx(v), top, sx(v), bottom, _GREY)
        c.line(sx(v), bottom, sx(v), bottom + 5, _BLACK)
        c.text(sx(v), bottom + 10, _fmt(v), anchor="center")
    for v in yt:
        c.line(left, sy(v), right, sy(v), _GREY)
        c.line(left - 5, sy(v), left, sy(v), _BLACK)
        c.text(left - 9, sy(v) - 5, _fmt(v), anchor="right")
    c.line(left, top, left, bottom, _BLACK)
    c.line(left, bottom, right, bottom, _BLACK)
    pts = [(sx(x), sy(y)) for x, y in zip(xs, ys)]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        c.line(x0, y0, x1, y1, _BLUE, r=1)
    for i, (x, y) in enumerate(pts):
        c.dot(x, y, _BLUE, r=4)
        if labels:
            c.text(x + 8, y - 16, labels[i], color=_BLUE)
    c.text(width // 2, 6, title, anchor="center")
    c.text((left + right) // 2, height - 24, x_label, anchor="center")
    c.text(8, top - 18, y_label)
    write_png(path, width, height, c.px)
