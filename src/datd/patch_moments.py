"""Patch moments of a convolution's input without forming the patches (the shift structure of im2col).

A conv's input patch at output position o holds, for each kernel tap p = (i, j), the zero-padded input Q at
s·o + p·d (stride s, dilation d), so every C×C block of Σ_patches x xᵀ pairs two taps:

    B(p, p') = Σ_o Q[s·o + p·d] Q[s·o + p'·d]ᵀ        (C input channels; D = C·kh·kw)

Writing each offset p·d = s·q + r as a phase r ∈ [0, s) and a step q (the polyphase form: plane Q_r[v] =
Q[s·v + r]), this is Σ_{v ∈ box(p)} Q_r[v] Q_{r'}[v + q' − q]ᵀ over the box v ∈ q + [0, Ho)×[0, Wo): a
cross-correlation of two phase planes at one shift, cut to a box. The planes are zero outside the image, so

    B(p, p') = F[δ] − Σ_{rows y ∉ box} Row_y[δ] − Σ_{cols x ∉ box} Col_x[δ] + Σ_{both} Point_yx[δ]

with F the cross-correlation over every image pixel and Row/Col/Point the same sums over the few image rows and
columns that the box leaves out (the border: at most d·(k − 1) of them). One call of a convolution's weight
gradient (``torch.nn.grad.conv2d_weight``: oneDNN on CPUs, cuDNN on GPUs) gives such a cross-correlation at
every shift of a window at once, so a stride-1 3×3 conv needs one call over the image for the 15 shifts with
δy ≥ 0 (B(p', p) = B(p, p')ᵀ gives the rest; from ``SPLIT_CHANNELS`` on two calls, for 3 + 10 of them) and thin
ones along the border, where im2col forms a (9C)×(9C) product: 15/9 of the conv's own multiply-adds instead of 9×
(T = C). Exact for zero padding, any stride,
dilation, kernel and image size; each call reduces over at most ``POSITIONS_PER_CALL`` positions in the compute
dtype and the calls are summed in float64.

Sums here are in *tap-major* order (tap, channel), so that each block is a contiguous C×C piece;
``channel_major`` turns them into ``F.unfold`` order (channel, tap).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.grad import conv2d_weight

# Positions (images × pixels) one weight-gradient call reduces over in the compute dtype: bounds the rounding of a
# float32 reduction (measured: relative error 1e-7 at 2^14 positions, 1e-6 at 2^17) and keeps operands in cache.
POSITIONS_PER_CALL = 1 << 14
# Relative cost of moving one element through memory against one multiply-add, for choosing between this
# formulation and im2col (whose unfolded copy is kh·kw times the input).
MEMORY_WEIGHT = 8
# The fewest input channels (per group) for which the shifted formulation is used.
MIN_CHANNELS = 8
# Single-channel sets (depthwise convs) are correlated this many at a time.
BLOCK = 8
# From this many channels (per set) on, the shifts of a window are computed in two windows where that saves a tenth
# of them (``_cover``); below it only where that saves a quarter. For narrower sets the weight-gradient kernels gain
# more from one wider window than the few extra shifts cost (measured on 2 CPU cores, stride-1 3×3: one window of 15
# shifts / two of 3 + 10, time against the conv's forward pass: 64 channels at 56×56 1.46× / 1.97×, 128 at 28×28
# 1.38× / 1.46×, 256 at 14×14 1.78× / 1.69×, 512 at 7×7 2.65× / 2.16×).
SPLIT_CHANNELS = 256
# Elements of the blocks added to the float64 sums at once (a bound on that temporary: 2^22 ≈ 32 MiB).
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv's patch moments depend on: kernel (kh, kw), stride, dilation, zero padding (left, right, top,
    bottom) and the input's spatial size (H, W)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]
    input_hw: tuple[int, int]

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.axis(0).out, self.axis(1).out

    @property
    def taps(self) -> list[tuple[int, int]]:
        """Kernel taps (i, j) in ``F.unfold`` order."""
        return [(i, j) for i in range(self.kernel[0]) for j in range(self.kernel[1])]

    def axis(self, axis: int) -> "_Axis":
        before, after = (self.pad[2], self.pad[3]) if axis == 0 else (self.pad[0], self.pad[1])
        return _Axis(self.kernel[axis], self.stride[axis], self.dilation[axis], before, after, self.input_hw[axis])


@dataclass(frozen=True)
class _Axis:
    """One spatial axis: tap i sits at phase (i·d) mod s and step (i·d) div s of the padded input."""

    k: int
    s: int
    d: int
    before: int  # zero padding before the image
    after: int
    size: int  # image extent

    @functools.cached_property
    def out(self) -> int:
        return (self.before + self.size + self.after - self.d * (self.k - 1) - 1) // self.s + 1

    def phase(self, i: int) -> int:
        return (i * self.d) % self.s

    def step(self, i: int) -> int:
        return (i * self.d) // self.s

    def image(self, r: int) -> range:
        """Plane coordinates v of phase r that hold image pixels: before ≤ s·v + r < before + size."""
        first = max(0, -(-(self.before - r) // self.s))
        return range(first, max(first, (self.before + self.size - 1 - r) // self.s + 1))

    def pixel(self, r: int, v: int) -> int:
        """The image coordinate of plane coordinate v of phase r."""
        return self.s * v + r - self.before

    def left_out(self, i: int) -> tuple[int, ...]:
        """Image coordinates of tap i's plane outside its box [step, step + out)."""
        q = self.step(i)
        return tuple(v for v in self.image(self.phase(i)) if not q <= v < q + self.out)


@dataclass(frozen=True)
class _Window:
    """Shifts start + κ·dilation for κ < size, per axis."""

    start: tuple[int, int]
    size: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def spanning(cls, shifts: list[tuple[int, int]], dilation: tuple[int, int] | None = None) -> "_Window":
        """The least window holding ``shifts`` (their common step as dilation unless given)."""
        start, size, steps = [], [], []
        for axis in (0, 1):
            values = sorted({s[axis] for s in shifts})
            step = dilation[axis] if dilation else (math.gcd(*[v - values[0] for v in values]) or 1)
            start.append(values[0])
            steps.append(step)
            size.append((values[-1] - values[0]) // step + 1)
        return cls(tuple(start), tuple(size), tuple(steps))  # type: ignore[arg-type]

    def index(self, shift: tuple[int, int]) -> tuple[int, int] | None:
        """κ of ``shift``, None if the window does not hold it."""
        k = tuple((s - a) // d for s, a, d in zip(shift, self.start, self.dilation))
        return k if all(0 <= v < n for v, n in zip(k, self.size)) else None  # type: ignore[return-value]


@dataclass(frozen=True)
class _Term:
    """One cross-correlation: Σ over the first phase plane's ``region`` (y0, y1, x0, x1) of first[v] second[v +
    shift]ᵀ at every shift of ``window``."""

    first: tuple[int, int]
    second: tuple[int, int]
    region: tuple[int, int, int, int]
    window: _Window

    @property
    def positions(self) -> int:
        return (self.region[1] - self.region[0]) * (self.region[3] - self.region[2])

    @property
    def shifts(self) -> int:
        return self.window.size[0] * self.window.size[1]


@dataclass(frozen=True)
class _Schedule:
    """What ``accumulate_shifted`` computes for a geometry: the terms, and for each block (a, b), a ≤ b, the signed
    window entries of the terms that sum to it: (term, (ky, kx), ±1)."""

    terms: tuple[_Term, ...]
    blocks: tuple[tuple[int, int, tuple[tuple[int, tuple[int, int], int], ...]], ...]

    @property
    def shifts(self) -> int:
        """Shifts of all terms: the rows of ``shifted_terms``' first result."""
        return sum(t.shifts for t in self.terms)


@functools.lru_cache(maxsize=512)
def _schedule(geometry: ConvGeometry, wide: bool = False) -> _Schedule:
    """The terms of every block p ≤ p' (module docstring): per pair of phase planes the full cross-correlation over
    the first plane's image (in one window, or two where that pays: ``_cover``), then for each image row and column
    that some tap's box leaves out (and each such corner) a correction term at the shifts that need it and reach the
    second plane's image."""
    ay, ax = geometry.axis(0), geometry.axis(1)
    taps = geometry.taps
    served: dict[tuple, list] = {}
    for a, (i, j) in enumerate(taps):
        for b in range(a, len(taps)):
            i2, j2 = taps[b]
            planes = ((ay.phase(i), ax.phase(j)), (ay.phase(i2), ax.phase(j2)))
            shift = (ay.step(i2) - ay.step(i), ax.step(j2) - ax.step(j))
            served.setdefault(planes, []).append((a, b, shift, ay.left_out(i), ax.left_out(j)))
    terms: list[_Term] = []
    blocks = []
    for (first, second), pairs in served.items():
        rows, cols = ay.image(first[0]), ax.image(first[1])
        rows2, cols2 = ay.image(second[0]), ax.image(second[1])
        if not rows or not cols or not rows2 or not cols2:
            continue  # a plane without image pixels: these blocks are zero
        windows = _cover([p[2] for p in pairs], wide)
        dilation = windows[0].dilation
        full = [len(terms) + n for n in range(len(windows))]
        terms += [_Term(first, second, (rows.start, rows.stop, cols.start, cols.stop), w) for w in windows]

        def border(region: tuple[int, int, int, int], users: list) -> int | None:
            """A correction term over ``region`` at the shifts of ``users`` that reach the second plane's image."""
            y0, y1, x0, x1 = region
            live = [p[2] for p in users if y0 + p[2][0] < rows2.stop and y1 + p[2][0] > rows2.start
                    and x0 + p[2][1] < cols2.stop and x1 + p[2][1] > cols2.start]
            if not live:
                return None
            terms.append(_Term(first, second, region, _Window.spanning(live, dilation)))
            return len(terms) - 1

        lines: dict[tuple, int | None] = {}
        for y in sorted({y for p in pairs for y in p[3]}):
            lines["row", y] = border((y, y + 1, cols.start, cols.stop), [p for p in pairs if y in p[3]])
        for v in sorted({v for p in pairs for v in p[4]}):
            lines["col", v] = border((rows.start, rows.stop, v, v + 1), [p for p in pairs if v in p[4]])
        for y, v in sorted({(y, v) for p in pairs for y in p[3] for v in p[4]}):
            lines["point", y, v] = border((y, y + 1, v, v + 1), [p for p in pairs if y in p[3] and v in p[4]])
        for a, b, shift, left_rows, left_cols in pairs:
            parts = [(t, k, 1) for t in full if (k := terms[t].window.index(shift)) is not None][:1]
            keys = [(("row", y), -1) for y in left_rows] + [(("col", v), -1) for v in left_cols] \
                + [(("point", y, v), 1) for y in left_rows for v in left_cols]
            for key, sign in keys:
                t = lines[key]
                if t is not None and (k := terms[t].window.index(shift)) is not None:
                    parts.append((t, k, sign))
            blocks.append((a, b, tuple(parts)))
    return _Schedule(tuple(terms), tuple(blocks))


@functools.lru_cache(maxsize=512)
def _combination_cpu(schedule: _Schedule, dtype: torch.dtype) -> Tensor:
    """(blocks, all shifts of all terms): entry ±1 where a term's shift enters a block (``_Schedule.blocks``)."""
    offsets = [0]
    for t in schedule.terms:
        offsets.append(offsets[-1] + t.shifts)
    matrix = torch.zeros(len(schedule.blocks), offsets[-1], dtype=dtype)
    for row, (_, _, parts) in enumerate(schedule.blocks):
        for term, (ky, kx), sign in parts:
            matrix[row, offsets[term] + ky * schedule.terms[term].window.size[1] + kx] += sign
    return matrix


def _combination(schedule: _Schedule, dtype: torch.dtype, device: torch.device) -> Tensor:
    return _combination_cpu(schedule, dtype).to(device)


def _block_index(schedule: _Schedule, device: torch.device) -> tuple[Tensor, Tensor]:
    """The taps (a, b) of the blocks, as index tensors."""
    a = torch.tensor([blk[0] for blk in schedule.blocks], device=device)
    b = torch.tensor([blk[1] for blk in schedule.blocks], device=device)
    return a, b


def _cover(shifts: list[tuple[int, int]], wide: bool) -> tuple[_Window, ...]:
    """Windows for ``shifts``: their spanning window, or that of the first row of shifts and that of the others when
    this saves at least a quarter of the shifts computed, or (``wide`` sets of channels) at least a tenth (a stride-1
    3×3 kernel: 3 + 10 shifts instead of 15, ``SPLIT_CHANNELS``)."""
    whole = _Window.spanning(shifts)
    top = [s for s in shifts if s[0] == whole.start[0]]
    rest = [s for s in shifts if s[0] != whole.start[0]]
    if rest:
        split = (_Window.spanning(top, whole.dilation), _Window.spanning(rest, whole.dilation))
        saved = 1 - sum(w.size[0] * w.size[1] for w in split) / (whole.size[0] * whole.size[1])
        if saved >= (0.1 if wide else 0.25):
            return split
    return (whole,)


def wide_sets(channels: int) -> bool:
    """Whether sets of ``channels`` channels are wide enough to have their windows split at a tenth saved
    (``SPLIT_CHANNELS``)."""
    return channels >= SPLIT_CHANNELS


def shift_cost(geometry: ConvGeometry, channels: int) -> float:
    """Estimated work (multiply-adds, plus memory traffic weighted by ``MEMORY_WEIGHT``) of ``accumulate_shifted``
    per image and group of ``channels`` input channels."""
    return sum(t.positions * (t.shifts * channels * channels + 2 * MEMORY_WEIGHT * channels)
               for t in _schedule(geometry, wide_sets(channels)).terms)


def im2col_cost(geometry: ConvGeometry, channels: int, positions: int | None = None) -> float:
    """Estimated work of the im2col formulation per image: the unfolded copy, then one D×D product (over all
    output positions, or ``positions`` of them)."""
    dim = channels * geometry.kernel[0] * geometry.kernel[1]
    if positions is None:
        positions = geometry.output_hw[0] * geometry.output_hw[1]
    return positions * (dim * dim + 3 * MEMORY_WEIGHT * dim)


def prefers_shifts(geometry: ConvGeometry, channels: int) -> bool:
    """Whether ``accumulate_shifted`` is expected to be cheaper than im2col for this conv (per group of
    ``channels``). Below ``MIN_CHANNELS`` the weight-gradient kernels run far below their speed (measured on 2 CPU
    cores: a 3-channel stem and depthwise convs are no faster, or slower, than im2col), so im2col is kept there.
    A 1×1 conv has no shift structure to use: its columns are its input, whose Gram matrix ``datd.stats`` forms
    by halves (its blocks on and above the diagonal), faster than the weight-gradient kernel forms all of it."""
    if geometry.kernel == (1, 1):
        return False
    if channels == 1:  # depthwise: correlated BLOCK channels at a time (``_correlate``)
        return shift_cost(geometry, BLOCK) / BLOCK < im2col_cost(geometry, 1)
    return channels >= MIN_CHANNELS and shift_cost(geometry, channels) < im2col_cost(geometry, channels)


def exact_cost(geometry: ConvGeometry, channels: int, zero_padding: bool = True) -> float:
    """Estimated work per image and group of ``channels`` of the exact formulation that is used: shifts where
    ``prefers_shifts`` (and the padding is zeros), else im2col."""
    if zero_padding and prefers_shifts(geometry, channels):
        return shift_cost(geometry, BLOCK) / BLOCK if channels == 1 else shift_cost(geometry, channels)
    return im2col_cost(geometry, channels)


def geometry_of(conv: torch.nn.Conv2d, pad: tuple[int, int, int, int], input_hw: tuple[int, int]) -> ConvGeometry:
    """The ``ConvGeometry`` of ``conv`` on inputs of ``input_hw`` with the F.pad amounts ``pad``."""
    return ConvGeometry(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), tuple(pad),  # type: ignore[arg-type]
                        tuple(input_hw))  # type: ignore[arg-type]


class _Plane:
    """The image pixels of one phase plane (N, channels, rows, cols) and their plane coordinates."""

    def __init__(self, x: Tensor, ay: _Axis, ax: _Axis, phase: tuple[int, int]):
        self.rows, self.cols = ay.image(phase[0]), ax.image(phase[1])
        y0, x0 = ay.pixel(phase[0], self.rows.start), ax.pixel(phase[1], self.cols.start)
        self.pixels = x[:, :, y0::ay.s, x0::ax.s][:, :, :len(self.rows), :len(self.cols)]
        if ay.s > 1 or ax.s > 1:
            self.pixels = self.pixels.contiguous()

    def region(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Plane coordinates [y0, y1)×[x0, x1), zero outside the image."""
        r, c = self.rows.start, self.cols.start
        h, w = len(self.rows), len(self.cols)
        if y0 >= r and y1 <= r + h and x0 >= c and x1 <= c + w:
            return self.pixels[:, :, y0 - r:y1 - r, x0 - c:x1 - c]
        out = self.pixels.new_zeros(*self.pixels.shape[:2], y1 - y0, x1 - x0)
        top, bottom = max(y0, r), min(y1, r + h)
        left, right = max(x0, c), min(x1, c + w)
        if top < bottom and left < right:
            out[:, :, top - y0:bottom - y0, left - x0:right - x0] = self.pixels[:, :, top - r:bottom - r, left - c:right - c]
        return out


def _correlate(first: _Plane, second: _Plane, term: _Term, sets: int) -> Tensor:
    """The term for each of ``sets`` independent channel sets stacked along the planes' channels:
    (Ky, Kx, sets, C, C) in the compute dtype (chunks of images summed in float64)."""
    (ky, kx), (sy, sx), (dy, dx) = term.window.size, term.window.start, term.window.dilation
    y0, y1, x0, x1 = term.region
    g = first.region(y0, y1, x0, x1)
    w = second.region(y0 + sy, y1 + sy + dy * (ky - 1), x0 + sx, x1 + sx + dx * (kx - 1))
    n, c = g.shape[0], g.shape[1] // sets
    positions = term.positions
    if min(y1 - y0, x1 - x0) == 1:  # a border line or point: one GEMM per set against the window's shifted copies
        # (N, sets·C, Ky·Kx, h, w), channel major as F.unfold's, whose CPU kernel loops over images (3× slower here)
        shifted = torch.stack([w[:, :, a * dy:a * dy + y1 - y0, b * dx:b * dx + x1 - x0]
                               for a in range(ky) for b in range(kx)], dim=2)
        rows = shifted.view(n, sets, -1, positions).permute(1, 0, 3, 2).reshape(sets, n * positions, -1)
        product = torch.bmm(g.reshape(n, sets, c, positions).permute(1, 2, 0, 3).reshape(sets, c, n * positions), rows)
        return product.view(sets, c, c, ky, kx).permute(3, 4, 0, 1, 2).contiguous()
    per_call = max(1, POSITIONS_PER_CALL // positions)
    # single-channel sets (depthwise convs) are correlated BLOCK at a time, as BLOCK-channel sets whose diagonals
    # are kept: the weight-gradient kernels run an order of magnitude faster that way than one channel at a time
    block = next((b for b in (BLOCK, BLOCK // 2, 2) if c == 1 and sets % b == 0), 1)
    width = c * block
    shape = (sets * c, width, ky, kx)
    groups = sets // block
    if per_call >= n:
        result = conv2d_weight(w, shape, g, dilation=(dy, dx), groups=groups)
    else:
        result = sum(conv2d_weight(w[s:s + per_call], shape, g[s:s + per_call], dilation=(dy, dx), groups=groups)
                     .double() for s in range(0, n, per_call)).to(g.dtype)
    if block > 1:  # (groups·block, block, Ky, Kx) → the diagonal of each block
        result = result.view(groups, block, block, ky, kx).diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2)
    return result.reshape(sets, c, c, ky, kx).permute(3, 4, 0, 1, 2).contiguous()


def shifted_terms(x: Tensor, geometry: ConvGeometry, sets: int = 1) -> tuple[Tensor, Tensor]:
    """The cross-correlation terms of the patch moments of ``x`` (N, sets·C, H, W) under a zero-padded conv of
    ``geometry``, for ``sets`` independent sets of C channels stacked along the channels (the groups of a grouped
    conv, the folds of the statistics; an absent image of a set is all zeros): (shifts of all terms, sets·C·C) in
    the compute dtype, which ``add_terms`` turns into blocks, and each image's patch sum per set (N, taps, sets, C).
    Sums of the terms over several calls (in float64) may be added at once: the map to blocks is linear."""
    ay, ax = geometry.axis(0), geometry.axis(1)
    planes: dict[tuple[int, int], _Plane] = {}

    def plane(phase: tuple[int, int]) -> _Plane:
        if phase not in planes:
            planes[phase] = _Plane(x, ay, ax, phase)
        return planes[phase]

    c = x.shape[1] // sets
    schedule = _schedule(geometry, wide_sets(c))
    terms = [_correlate(plane(t.first), plane(t.second), t, sets).view(t.shifts, -1) for t in schedule.terms]
    sums = torch.cat(terms) if terms else x.new_zeros(0, sets * c * c)
    return sums, _per_image_sums(x, geometry, plane).view(x.shape[0], len(geometry.taps), sets, -1)


def defers_terms(geometry: ConvGeometry, channels: int) -> bool:
    """Whether the terms are fewer than the blocks they make (then their sums are kept and turned into blocks once,
    at the end; otherwise each call's terms are added to the blocks at once)."""
    schedule = _schedule(geometry, wide_sets(channels))
    return schedule.shifts < len(schedule.blocks)


def term_elements(geometry: ConvGeometry, channels: int, sets: int = 1) -> int:
    """Elements of ``shifted_terms``' first result."""
    return _schedule(geometry, wide_sets(channels)).shifts * sets * channels * channels


def add_terms(sums: Tensor, geometry: ConvGeometry, blocks: Tensor) -> None:
    """Add the blocks B(p, p'), p ≤ p', that the term sums ``sums`` (``shifted_terms``) make into ``blocks``
    (sets, taps, C, taps, C) float64 (the upper block triangle; the rest is left alone)."""
    sets, c = blocks.shape[0], blocks.shape[2]
    schedule = _schedule(geometry, wide_sets(c))
    if not schedule.terms:
        return
    combination = _combination(schedule, sums.dtype, sums.device)  # (blocks, shifts): each block's signed sum
    a, b = _block_index(schedule, sums.device)
    target = blocks.permute(1, 3, 0, 2, 4)  # (taps, taps, sets, C, C), a view
    step = max(1, BLOCK_ELEMENTS // sums.shape[1])  # bounds the temporary
    for start in range(0, len(schedule.blocks), step):
        rows = slice(start, start + step)
        combined = (combination[rows] @ sums).view(-1, sets, c, c).to(blocks.dtype)
        target.index_put_((a[rows], b[rows]), combined, accumulate=True)


def accumulate_shifted(x: Tensor, geometry: ConvGeometry, blocks: Tensor, sets: int = 1) -> Tensor:
    """Add the blocks B(p, p'), p ≤ p', of Σ_patches x xᵀ under a zero-padded conv of ``geometry`` into ``blocks``
    (sets, taps, C, taps, C) float64 (the upper block triangle; the rest is left alone), for ``sets`` sets of C
    channels stacked along the channels of ``x`` (N, sets·C, H, W) (``shifted_terms``). Return each image's patch
    sum per set (N, taps, sets, C) in the compute dtype."""
    sums, per_image = shifted_terms(x, geometry, sets)
    add_terms(sums, geometry, blocks)
    return per_image


def _per_image_sums(x: Tensor, geometry: ConvGeometry, plane) -> Tensor:
    """Each image's patch sum per tap (N, taps, channels): its plane's pixel sum less the rows and columns its box
    leaves out (inclusion–exclusion, one pass over each plane; the sums are shared by the taps of a plane)."""
    ay, ax = geometry.axis(0), geometry.axis(1)
    n, c = x.shape[:2]
    cache: dict[tuple, Tensor] = {}

    def summed(key: tuple, make) -> Tensor:
        if key not in cache:
            cache[key] = make()
        return cache[key]

    sums = []
    for i, j in geometry.taps:
        phase = (ay.phase(i), ax.phase(j))
        p = plane(phase)
        if not p.rows or not p.cols:
            sums.append(x.new_zeros(n, c))
            continue
        rows, cols = ay.left_out(i), ax.left_out(j)
        total = summed((phase,), lambda: p.pixels.sum(dim=(2, 3)))
        for y in rows:
            total = total - summed((phase, "row", y), lambda: p.pixels[:, :, y - p.rows.start].sum(dim=2))
        for v in cols:
            total = total - summed((phase, "col", v), lambda: p.pixels[:, :, :, v - p.cols.start].sum(dim=2))
        for y in rows:
            for v in cols:
                total = total + p.pixels[:, :, y - p.rows.start, v - p.cols.start]
        sums.append(total)
    return torch.stack(sums, dim=1)


def channel_major(blocks: Tensor) -> Tensor:
    """(…, taps, C, taps, C) sums whose blocks p ≤ p' are complete → the symmetric (…, D, D) matrix in ``F.unfold``
    order (channel major, then tap), D = C·taps. The blocks p > p' of ``blocks`` are overwritten with the
    transposes of their mirror images first."""
    *lead, taps, c, _, _ = blocks.shape
    for a in range(taps):
        for b in range(a + 1, taps):
            blocks[..., b, :, a, :] = blocks[..., a, :, b, :].transpose(-1, -2)
    dims = len(lead)
    return blocks.permute(*range(dims), dims + 1, dims, dims + 3, dims + 2).reshape(*lead, c * taps, c * taps)


def tap_major(matrix: Tensor, taps: int) -> Tensor:
    """A view of (…, D, D) in ``F.unfold`` order as (…, taps, C, taps, C)."""
    *lead, d, _ = matrix.shape
    return matrix.view(*lead, d // taps, taps, d // taps, taps).permute(*range(len(lead)),
                                                                      *(len(lead) + i for i in (1, 0, 3, 2)))
