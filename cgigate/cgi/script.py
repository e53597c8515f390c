"""Which file runs for a URL, and with which command line.

`locate` walks the decoded path segments (see cgigate.front.paths) down
from the CGI directory: directories are entered, the first regular file is
the script, and the segments after it are PATH_INFO (RFC 3875 section
4.1.5).  Nothing outside the directory ever runs:

- segments are already free of '/', '..', NUL and control characters;
- names starting with '.' are never served (404);
- the script's real path, symlinks resolved, must lie inside the real CGI
  directory (403 otherwise);
- a directory, device, FIFO or socket is never run (403);
- a file without an execute bit runs only when an interpreter is mapped
  for its extension (403 otherwise).

`command_line` adds the RFC 3875 section 4.4 search words: a query with no
unencoded '=' is split on '+' and each word percent-decoded.  The words go
straight into execve's argv; no shell is involved anywhere.  When a word
is empty, holds a NUL, starts with '-' (the CVE-2012-1823 php-cgi option
injection) or the words are too long, no words are passed at all, which
the RFC allows ("the server MUST NOT generate any command line
information" when it cannot build it).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from cgigate.errors import HTTPError

MAX_SEARCH_BYTES = 16384


@dataclass(frozen=True)
class Script:
    filename: bytes        # real path of the file
    directory: bytes       # where it runs (its own directory)
    script_name: str       # URL path of the script, latin-1 str
    path_info: str         # decoded path after it, latin-1 str ("" if none)
    interpreter: tuple[str, ...] = ()

    @property
    def is_nph(self) -> bool:
        return os.path.basename(self.filename).startswith(b"nph-")


def locate(root: bytes, prefix: str, segments: list[bytes],
           interpreters: dict[str, list[str]]) -> Script:
    """Find the script for `segments` (the decoded path after `prefix`) under `root`,
    the real path of the CGI directory."""
    current = root
    via_symlink = False
    for index, segment in enumerate(segments):
        if segment.startswith(b"."):
            raise HTTPError(404, f"hidden name {segment!r} is never served")
        candidate = os.path.join(current, segment)
        try:
            info = os.lstat(candidate)
            if stat.S_ISLNK(info.st_mode):
                via_symlink = True
                info = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            raise HTTPError(404, f"no script {os.fsdecode(candidate)}") from None
        except PermissionError:
            raise HTTPError(403, f"cannot look up {os.fsdecode(candidate)} (permission denied)") from None
        except OSError as e:
            raise HTTPError(404, f"cannot look up {os.fsdecode(candidate)}: {e.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            current = candidate
            continue
        # Without a symlink on the way, the walk itself stayed inside root;
        # with one, only the resolved path can tell.
        real = os.path.realpath(candidate) if via_symlink else candidate
        interpreter = _runnable(root, candidate, real, info, interpreters)
        script_name = prefix + "/".join(s.decode("latin-1") for s in segments[:index + 1])
        rest = segments[index + 1:]
        path_info = ("/" + "/".join(s.decode("latin-1") for s in rest)) if rest else ""
        return Script(filename=real, directory=os.path.dirname(real), script_name=script_name,
                      path_info=path_info, interpreter=interpreter)
    raise HTTPError(403 if segments else 404, f"{os.fsdecode(current)} is a directory, not a script")


def _runnable(root: bytes, candidate: bytes, real: bytes, info: os.stat_result,
              interpreters: dict[str, list[str]]) -> tuple[str, ...]:
    """Refuse what must not run (403); the interpreter a file needs, () if none."""
    if not real.startswith(root + b"/"):
        raise HTTPError(403, f"{os.fsdecode(candidate)} resolves to {os.fsdecode(real)}, "
                        "outside the CGI directory")
    if not stat.S_ISREG(info.st_mode):
        raise HTTPError(403, f"{os.fsdecode(candidate)} is not a regular file")
    if os.access(real, os.X_OK):
        return ()
    ext = os.path.splitext(real)[1].decode("latin-1").lower()
    mapped = interpreters.get(ext)
    if mapped is None:
        raise HTTPError(403, f"{os.fsdecode(real)} is not executable and no interpreter is "
                        f"mapped for {ext or 'files without an extension'!s} ([cgi] interpreters)")
    return tuple(mapped)


def locate_file(root: bytes, filename: bytes,
                interpreters: dict[str, list[str]]) -> tuple[bytes, bytes, tuple[str, ...]]:
    """The script a web server named by path (FastCGI SCRIPT_FILENAME), as
    (real path, path info, interpreter).  When `filename` goes on past a file,
    as `$document_root$fastcgi_script_name` does for /cgi-bin/x.sh/more, the
    walk goes up to the file and the rest is path info (what Apache and
    fcgiwrap do).  `..` and symlinks are resolved before the file is judged,
    so nothing outside `root` (a real path) ever runs: 403.  Control
    characters (a `%0a` that made nginx's split_path_info regex fail, the
    CVE-2019-11043 pattern) are refused with 400."""
    if any(c < 0x20 or c == 0x7F for c in filename):
        raise HTTPError(400, f"control character in SCRIPT_FILENAME {filename[:200]!r}")
    if not filename.startswith(b"/"):
        raise HTTPError(400, f"SCRIPT_FILENAME {filename[:200]!r} is not an absolute path")
    # A trailing slash is path info ("/"), as Apache gives /x.sh/ PATH_INFO "/".
    candidate = filename.rstrip(b"/") or b"/"
    rest = b"/" if candidate != filename else b""
    for _ in range(filename.count(b"/") + 1):
        try:
            info = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            head, tail = os.path.split(candidate)
            candidate, rest = head, b"/" + tail + rest
            continue
        except OSError as e:
            raise HTTPError(403, f"cannot look up {os.fsdecode(candidate)}: {e.strerror}") from None
        real = os.path.realpath(candidate)
        if stat.S_ISDIR(info.st_mode):
            if not (real + b"/").startswith(root + b"/"):
                raise HTTPError(403, f"{os.fsdecode(filename)} is outside the CGI directory")
            if rest and rest != b"/":
                raise HTTPError(404, f"no script {os.fsdecode(filename)}")
            raise HTTPError(403, f"{os.fsdecode(candidate)} is a directory, not a script")
        inside = real[len(root) + 1:] if real.startswith(root + b"/") else b""
        asked = candidate[len(root) + 1:] if candidate.startswith(root + b"/") else b""
        named = [part for part in asked.split(b"/") if part not in (b"", b".", b"..")]
        if any(part.startswith(b".") for part in inside.split(b"/") + named):
            raise HTTPError(404, f"hidden name in {os.fsdecode(candidate)} is never served")
        return real, rest, _runnable(root, candidate, real, info, interpreters)
    raise HTTPError(404, f"no script {os.fsdecode(filename)}")


def search_words(query: bytes) -> list[bytes]:
    """RFC 3875 section 4.4 command-line words of `query`, or [] when there are none."""
    if not query or b"=" in query:
        return []
    words = [unquote_to_bytes(word) for word in query.split(b"+")]
    if (any(not w or b"\x00" in w or w.startswith(b"-") for w in words)
            or sum(len(w) for w in words) > MAX_SEARCH_BYTES):
        return []
    return words


def command_line(script: Script, query: bytes, isindex: bool) -> list[bytes]:
    argv = [os.fsencode(part) for part in script.interpreter] + [script.filename]
    if isindex:
        argv.extend(search_words(query))
    return argv
