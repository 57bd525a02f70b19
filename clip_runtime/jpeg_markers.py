"""Counting a JPEG's scans from its markers, before any pixel is decoded.

A progressive JPEG refines its coefficients over several scans, and a decoder does work over the
whole image for each one: thousands of repeated scans in a file of a few hundred KB cost seconds
of CPU, while Pillow's bomb check bounds pixels only. Encoders write one scan (baseline) or about
ten (libjpeg's progressive script); mozjpeg's optimised scripts stay within a few dozen.
"""

from __future__ import annotations

import re

_SOI = b"\xff\xd8"
_SOS = 0xDA
_EOI = 0xD9
# Markers that carry no length: TEM and the restart markers RST0..RST7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Inside a scan's entropy-coded data a 0xFF is followed by 0x00 (a stuffed byte), a restart
# marker or another 0xFF (fill): anything else ends the scan.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")


def jpeg_scan_count(data: bytes, stop_after: int) -> int:
    """Start-of-scan markers in the first image of ``data`` (a JPEG), counted up to
    ``stop_after + 1`` (the caller only asks whether a limit is passed). Segments are skipped by
    their lengths, so a thumbnail inside EXIF is not counted; a stream that stops making sense
    ends the count (the decoder then names the problem)."""
    if not data.startswith(_SOI):
        return 0
    scans = 0
    position = len(_SOI)
    while position + 4 <= len(data) and scans <= stop_after:
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == _SOS:
            scans += 1
            found = _MARKER_AFTER_SCAN.search(data, position)
            if found is None:
                break
            position = found.start()
    return scans
