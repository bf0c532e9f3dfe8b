"""Row copies in generated kernel bodies (CUDA source, also compiled as C++ by the tests).

A thread that copies one particle row word by word issues one memory instruction per
element; a row of D float32 then costs D loads and D stores whose warps touch D times
the sectors of a 1-element row's. Where a row's bytes are a multiple of 16 (or 8) and
both ends of the copy are aligned to it, :func:`row_copy` moves it in 16-byte (8-byte)
words instead: one vector load and store per 16 bytes. Misaligned pointers (a view
with an odd offset) take the element loop, bit for bit the same copy.
"""

from __future__ import annotations

#: the unsigned word of each element size in bytes (a row is copied as its bits)
WORD = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}

#: the 16-byte word: CUDA's uint4 (one vector load/store), an aligned struct in plain C++
PRELUDE = "\n".join([
    "#if defined(__CUDACC__) || defined(__CUDACC_RTC__)",
    "typedef uint4 genmlx_v16;",
    "#else",
    "struct alignas(16) genmlx_v16 { uint32_t v[4]; };",
    "#endif",
])


def vector_word(nbytes: int, elem: int) -> tuple[str, int] | None:
    """(type, bytes) of the widest word that tiles a row of ``nbytes`` bytes of
    ``elem``-byte elements more coarsely than the elements: 16 or 8 bytes; None when the
    element words are already as wide."""
    if nbytes >= 16 and nbytes % 16 == 0:
        return "genmlx_v16", 16
    if elem < 8 and nbytes >= 8 and nbytes % 8 == 0:
        return "unsigned long long", 8
    return None


def row_copy(word: str, elem: int, w: int, src: str, dst: str) -> str:
    """A C statement copying one row of ``w`` elements of ``elem`` bytes (as words of type
    ``word``) from the word pointer ``src`` to ``dst``: in vector words where both are
    aligned to them (:func:`vector_word`), else element by element."""
    loop = f"for (int e_ = 0; e_ < {w}; ++e_) d_[e_] = s_[e_];"
    head = f"{{ const {word}* s_ = {src}; {word}* d_ = {dst}; "
    vec = vector_word(elem * w, elem)
    if vec is None:
        return head + loop + " }"
    vt, vb = vec
    aligned = (f"((reinterpret_cast<unsigned long long>(s_) | reinterpret_cast<unsigned long long>(d_)) "
               f"& {vb - 1}ULL) == 0ULL")
    return (head + f"if ({aligned}) {{ const {vt}* sv_ = reinterpret_cast<const {vt}*>(s_); "
            f"{vt}* dv_ = reinterpret_cast<{vt}*>(d_); "
            f"for (int e_ = 0; e_ < {elem * w // vb}; ++e_) dv_[e_] = sv_[e_]; }} else {{ {loop} }} }}")


def prelude(kinds) -> list:
    """The source lines a kernel body copying rows of these (element bytes, elements)
    kinds needs first: the 16-byte word's definition where some row uses it."""
    return [PRELUDE] if any(vector_word(b * w, b) == ("genmlx_v16", 16) for b, w in kinds) else []
