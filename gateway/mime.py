"""MIME structure walk over the raw bytes: the tree, its defects and byte offsets of each body.

Python's `email` feed parser handles every body line in Python code; on a mail with a 2 MB
attachment that is most of the gateway's CPU. This walk makes the same decisions as CPython's
`email.feedparser` (3.11) but finds boundaries with `bytes.find` and leaves bodies untouched:
only header blocks are parsed, by the stdlib (`email.parser.Parser`, headers only), so header
semantics (continuations, RFC 2231 parameters, unix-from lines) are the stdlib's own.

Same decisions means: lines end at CRLF, CR or LF; a part ends at a boundary line of its own
multipart or of any enclosing one (RFC 2046 5.1.2); consecutive boundary lines make no empty
part; the line break before a boundary belongs to the boundary; parts of a multipart/digest
default to message/rfc822; message/delivery-status holds header blocks; and the same defects
(StartBoundaryNotFound, CloseBoundaryNotFound, NoBoundaryInMultipart, MultipartInvariant-
Violation, MissingHeaderBodySeparator, InvalidMultipartContentTransferEncoding, and the header
defects). tests/test_mime.py checks part counts and defects against CPython on the corpus and on
generated shapes.
"""

from __future__ import annotations

import email.errors
import email.parser
import email.policy
import re
from dataclasses import dataclass, field
from email.message import Message

_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_WS = b" \t"
_HEADERS = email.parser.Parser(policy=email.policy.compat32)


@dataclass(slots=True)
class Node:
    """One MIME entity: its headers (stdlib Message, headers only) and where its body lies."""

    headers: Message
    start: int  # first byte of the entity (its headers)
    body_start: int
    body_end: int  # payload end, without the line break that belongs to a following boundary
    depth: int
    children: list[Node] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    is_multipart: bool = False
    gap: tuple[int, int] | None = None  # bytes inside [body_start, body_end) not in the payload

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """Byte ranges of the payload (still transfer-encoded) in the raw message."""
        if self.gap is None:
            return ((self.body_start, self.body_end),)
        return ((self.body_start, self.gap[0]), (self.gap[1], self.body_end))

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.spans)

    def walk(self) -> list[Node]:
        out: list[Node] = []
        stack = [self]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(node.children))
        return out


# Lines looked at one by one (header lines, boundary candidates, delivery-status lines) in one
# message: past it the walk stops and reports itself truncated. It keeps a hostile message (a
# 50 MB header block, a body of dash lines under a "-" boundary) to a fraction of a second.
STEP_BUDGET = 200_000
MAX_HEADER_LINES = 10_000  # of one entity; real mail has a few hundred at most


@dataclass(slots=True)
class Walk:
    raw: bytes
    max_parts: int
    max_depth: int
    count: int = 0
    truncated: bool = False
    steps: int = STEP_BUDGET

    def step(self) -> bool:
        """Spend one step; False (and truncated) once the budget is gone."""
        self.steps -= 1
        if self.steps < 0:
            self.truncated = True
            return False
        return True


def parse_tree(raw: bytes, *, max_parts: int, max_depth: int) -> tuple[Node, bool]:
    """The entity tree of a whole message; True when a limit stopped the walk."""
    walk = Walk(raw=raw, max_parts=max_parts, max_depth=max_depth)
    root = _entity(walk, 0, len(raw), depth=0, default_type="text/plain")
    if root.headers.get_content_maintype() == "multipart" and not root.is_multipart:
        root.defects.append("MultipartInvariantViolationDefect")
    return root, walk.truncated


def _line_end(raw: bytes, pos: int, end: int) -> int:
    m = _LINE_END.search(raw, pos, end)
    return m.end() if m else end


def _entity(walk: Walk, start: int, end: int, *, depth: int, default_type: str) -> Node:
    """Parse headers at `start`, then the body up to `end` (a boundary line or the end)."""
    walk.count += 1
    raw = walk.raw
    defects: list[str] = []
    pos = start
    body_start = end
    last_line = -1  # start of the last header line
    gap: tuple[int, int] | None = None
    lines_left = MAX_HEADER_LINES
    while pos < end:
        lines_left -= 1
        if lines_left < 0 or not walk.step():
            walk.truncated = True
            body_start = pos
            break
        nxt = _line_end(raw, pos, end)
        if not _HEADER_LINE.match(raw, pos, nxt):
            if raw[pos:pos + 1] in (b"\r", b"\n"):
                body_start = nxt  # the blank line separating headers from body
                gap = (pos, nxt)
            else:
                defects.append("MissingHeaderBodySeparatorDefect")
                body_start = pos
            break
        last_line, pos = pos, nxt
    header_end = pos
    if last_line > start and raw.startswith(b"From ", last_line):
        # A unix-from line ending a header block (not first) is the body's first line; the
        # blank line after it, if any, is still dropped (feedparser's _parse_headers).
        header_end, body_start = last_line, last_line
    else:
        gap = None
    header_text = raw[start:header_end].decode("ascii", "surrogateescape")
    # The stdlib would again take a trailing "From " line for the body's: a sentinel field
    # keeps it a (misplaced) header line, as it was in the whole block.
    sentinel = _last_line_is_from(header_text)
    headers = _HEADERS.parsestr(header_text + _SENTINEL if sentinel else header_text,
                                headersonly=True)
    if sentinel:
        del headers[_SENTINEL_NAME]
    headers.set_default_type(default_type)
    # A header-only parse of a multipart entity has no parts: CPython 3.11.2 (Debian 12's)
    # says so with MultipartInvariantViolationDefect on every multipart header block (3.11.7
    # does not). Whether the invariant holds is decided by this walk (parse_tree).
    defects[:0] = [type(d).__name__ for d in headers.defects
                   if not isinstance(d, email.errors.MultipartInvariantViolationDefect)]
    node = Node(headers=headers, start=start, body_start=body_start, body_end=end, depth=depth,
                defects=defects, gap=gap)
    if depth >= walk.max_depth or walk.count >= walk.max_parts:
        walk.truncated = walk.truncated or _is_container(headers)
        return node
    if gap is not None and _is_container(headers):
        # The body stream skips the blank line after a trailing "From " header line: parsers
        # disagree on such a container, and no mail software makes one. Flag, don't descend.
        node.defects.append(UNIX_FROM_CONTAINER)
        return node
    ctype = headers.get_content_type()
    if ctype == "message/delivery-status":
        _delivery_status(walk, node)
    elif headers.get_content_maintype() == "message":
        node.children.append(_entity(walk, body_start, end, depth=depth + 1,
                                     default_type="text/plain"))
        node.is_multipart = True
    elif headers.get_content_maintype() == "multipart":
        _multipart(walk, node, ctype)
    return node


UNIX_FROM_CONTAINER = "UnixFromEndsContainerHeadersDefect"  # ours, not the stdlib's
_SENTINEL_NAME = "X-Gateway-Mime-Sentinel-7f3c"
_SENTINEL = f"{_SENTINEL_NAME}: 1\n"


def _last_line_is_from(text: str) -> bool:
    stripped = text.rstrip("\r\n")
    cut = max(stripped.rfind("\n"), stripped.rfind("\r"))
    return cut >= 0 and stripped.startswith("From ", cut + 1)


def _is_container(headers: Message) -> bool:
    return headers.get_content_maintype() in ("multipart", "message")


def _multipart(walk: Walk, node: Node, ctype: str) -> None:
    headers = node.headers
    boundary = headers.get_boundary()
    if boundary is None:
        node.defects.append("NoBoundaryInMultipartDefect")
        return
    cte = str(headers.get("content-transfer-encoding", "8bit")).lower()
    if cte not in ("7bit", "8bit", "binary"):
        node.defects.append("InvalidMultipartContentTransferEncodingDefect")
    lines = _boundary_lines(walk, boundary, node.body_start, node.body_end)
    if not lines or lines[0][1]:
        # Only what came before a (close) boundary line is kept as the payload.
        node.defects.append("StartBoundaryNotFoundDefect")
        if lines:
            node.body_end = lines[0][0]
        return
    node.is_multipart = True
    child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    i = 0
    while True:
        # Consecutive boundary lines (of either kind) open a single part.
        while i + 1 < len(lines) and lines[i + 1][0] == lines[i][2]:
            i += 1
        part_start = lines[i][2]
        if i + 1 < len(lines):
            part_end, followed = lines[i + 1][0], True
        else:
            part_end, followed = node.body_end, False
        if walk.count >= walk.max_parts:
            walk.truncated = True
            return
        child = _entity(walk, part_start, part_end, depth=node.depth + 1,
                        default_type=child_type)
        # The line break before a boundary belongs to it: it leaves the payload of the entity
        # parsed last (the part, or the innermost of a message/rfc822). CPython strips it at
        # the end of the data too.
        last = child
        while last.children and last.headers.get_content_maintype() != "multipart":
            last = last.children[-1]
        if last.headers.get_content_maintype() != "multipart":  # else: from its epilogue
            if last.gap is not None and last.gap[1] >= last.body_end:
                # The skipped blank line (after a trailing "From " header line) ends the part:
                # the payload stops before it.
                last.body_end, last.gap = last.gap[0], None
            last.body_end = _strip_eol(walk.raw, last.body_start, last.body_end)
        node.children.append(child)
        if not followed:
            node.defects.append("CloseBoundaryNotFoundDefect")
            return
        i += 1
        if lines[i][1]:  # the close boundary: the rest is epilogue
            return


def _strip_eol(raw: bytes, start: int, end: int) -> int:
    if end - start >= 2 and raw[end - 2:end] == b"\r\n":
        return end - 2
    if end > start and raw[end - 1:end] in (b"\r", b"\n"):
        return end - 1
    return end


def _boundary_lines(walk: Walk, boundary: str, start: int,
                    end: int) -> list[tuple[int, bool, int]]:
    """(line start, is close boundary, next line start) of each boundary line in [start, end)."""
    try:
        sep = b"--" + boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return []  # a decoded RFC 2231 boundary with real non-ASCII text matches no line
    raw = walk.raw
    found = []
    pos = raw.find(sep, start, end)
    while pos >= 0 and walk.step():
        if pos == start or raw[pos - 1] in b"\r\n":
            q = pos + len(sep)
            close = raw[q:q + 2] == b"--" and q + 2 <= end
            tail = q + 2 if close else q
            after = _after_ws(raw, tail, end)
            if after is None and close:
                close, after = False, _after_ws(raw, q, end)
            if after is not None:
                found.append((pos, close, after))
        pos = raw.find(sep, pos + 1, end)
    return found


def _after_ws(raw: bytes, pos: int, end: int) -> int | None:
    """After optional blanks, a line break (or the end of the data): where the next line starts."""
    while pos < end and raw[pos] in _WS:
        pos += 1
    if pos >= end:
        return end if end == len(raw) else None
    if raw[pos:pos + 2] == b"\r\n":
        return pos + 2
    if raw[pos] in b"\r\n":
        return pos + 1
    return None


def _delivery_status(walk: Walk, node: Node) -> None:
    """Blocks of header fields separated by blank lines, one child each."""
    raw = walk.raw
    pos, end = node.body_start, node.body_end
    node.is_multipart = True
    while True:
        block_end = pos
        while block_end < end and raw[block_end:block_end + 1] not in (b"\r", b"\n"):
            if not walk.step():
                return
            block_end = _line_end(raw, block_end, end)
        if walk.count >= walk.max_parts:
            walk.truncated = True
            return
        child = _entity(walk, pos, block_end, depth=node.depth + 1, default_type="text/plain")
        node.children.append(child)
        if block_end >= end:
            return
        pos = _line_end(raw, block_end, end)  # the blank line
        if pos >= end:
            return
