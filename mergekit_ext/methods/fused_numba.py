"""The numba kernels behind `fused` (imported only through it, since importing numba takes about 0.3 s).

Inputs arrive as bit patterns: uint16 for bf16 (shift 16), uint32 for float32
(shift 0). Every loop indexes a chunk view from 0, so that numba's wraparound check
for negative indices drops out and the loops vectorize. Compiled code is cached on
disk by numba (`cache=True`), so only the first run on a machine compiles.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from mergekit_ext.methods.fused import CHUNK, GROUP


@intrinsic
def _fma(typing_context, a, b, c):  # type: ignore[no-untyped-def]
    # This computes a * b + c with one rounding, as torch's add with alpha does on CPU.
    signature = types.float32(types.float32, types.float32, types.float32)

    def generate(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
        return builder.fma(*arguments)

    return signature, generate


@njit(inline="always")
def _load(source, start, count, shift, bits):  # type: ignore[no-untyped-def]
    chunk = source[start : start + count]
    # A constant shift keeps the loop in 32-bit lanes. With a shift by a variable, the
    # compiled loop worked in 64-bit lanes (vpsllvq), half as many per instruction.
    if shift == 16:
        for k in range(count):
            bits[k] = np.uint32(chunk[k]) << np.uint32(16)
    else:
        for k in range(count):
            bits[k] = np.uint32(chunk[k])


@njit(inline="always")
def _chunk_buffers():  # type: ignore[no-untyped-def]
    # Bit buffers for one chunk of the base and of a model, and their float32 views.
    base_bits = np.empty(CHUNK, np.uint32)
    model_bits = np.empty(CHUNK, np.uint32)
    return base_bits, model_bits, base_bits.view(np.float32), model_bits.view(np.float32)


@njit(inline="always")
def _store(values, bits, count, output, round_to_bf16):  # type: ignore[no-untyped-def]
    # `bits` is the uint32 view of `values`. A bf16 output gets each float32 rounded to the
    # nearest even bf16 and NaN as 0xFFFF, as torch's conversion does. A float32 output gets the bits.
    if round_to_bf16:
        for k in range(count):
            pattern = bits[k]
            rounded = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            output[k] = np.uint32(0xFFFF) if values[k] != values[k] else rounded
    else:
        for k in range(count):
            output[k] = bits[k]


@njit(cache=True, nogil=True)
def magnitudes_at(model, base, shift, positions, output):  # type: ignore[no-untyped-def]
    # Gather a chunk of bit patterns, then take |model - base| over it in one vectorized loop.
    base_bits, model_bits, base_values, model_values = _chunk_buffers()
    total = positions.shape[0]
    for start in range(0, total, CHUNK):
        size = min(CHUNK, total - start)
        chunk = positions[start : start + size]
        for k in range(size):
            base_bits[k] = np.uint32(base[chunk[k]]) << shift
            model_bits[k] = np.uint32(model[chunk[k]]) << shift
        target = output[start : start + size]
        for k in range(size):
            target[k] = abs(model_values[k] - base_values[k])


@njit(cache=True, nogil=True)
def all_finite(bits, shift):  # type: ignore[no-untyped-def]
    # A float is NaN or infinite exactly when its exponent bits are all ones, so the
    # largest pattern without the sign bit decides. The max reduction vectorizes.
    if shift == 16:
        largest_half = np.uint16(0)
        for k in range(bits.shape[0]):
            largest_half = max(largest_half, bits[k] & np.uint16(0x7FFF))
        return largest_half < np.uint16(0x7F80)
    largest = np.uint32(0)
    for k in range(bits.shape[0]):
        largest = max(largest, bits[k] & np.uint32(0x7FFFFFFF))
    return largest < np.uint32(0x7F800000)


@njit(cache=True, nogil=True)
def band(model, base, shift, low, high, tie, values, positions, chunk_ties):  # type: ignore[no-untyped-def]
    total = base.shape[0]
    capacity = values.shape[0] - GROUP
    base_bits, model_bits, base_values, model_values = _chunk_buffers()
    magnitudes = np.empty(CHUNK, np.float32)
    members = np.empty(CHUNK // GROUP + 1, np.int64)
    above = 0
    count = 0
    inside_total = 0
    for start in range(0, total, CHUNK):
        size = min(CHUNK, total - start)
        _load(base, start, size, shift, base_bits)
        _load(model, start, size, shift, model_bits)
        # Count per group of GROUP entries (a fixed trip count, so the loop vectorizes),
        # then collect from the groups that have members only. Entries equal to `tie`
        # are counted per chunk and not collected.
        groups = size // GROUP
        inside = 0
        ties = 0
        for group in range(groups + 1):
            first = group * GROUP
            group_above = 0
            group_inside = 0
            group_ties = 0
            if group < groups:
                for k in range(GROUP):
                    magnitude = abs(model_values[first + k] - base_values[first + k])
                    magnitudes[first + k] = magnitude
                    is_above = magnitude > high
                    is_tie = magnitude == tie
                    group_above += is_above
                    group_ties += is_tie
                    group_inside += (magnitude >= low) & (not is_above) & (not is_tie)
            else:
                for k in range(first, size):
                    magnitude = abs(model_values[k] - base_values[k])
                    magnitudes[k] = magnitude
                    is_above = magnitude > high
                    is_tie = magnitude == tie
                    group_above += is_above
                    group_ties += is_tie
                    group_inside += (magnitude >= low) & (not is_above) & (not is_tie)
            above += group_above
            ties += group_ties
            members[group] = group_inside
            inside += group_inside
        chunk_ties[start // CHUNK] = ties
        inside_total += inside
        if inside == 0 or inside_total > capacity:
            # Past the capacity only counting goes on, so the caller learns the size it needs.
            continue
        for group in range(groups + 1):
            if members[group] == 0:
                continue
            first = group * GROUP
            group_magnitudes = magnitudes[first : min(first + GROUP, size)]
            for k in range(group_magnitudes.shape[0]):
                # Written unconditionally, kept by advancing the count: no branch to mispredict.
                magnitude = group_magnitudes[k]
                values[count] = magnitude
                positions[count] = start + first + k
                count += (magnitude >= low) & (magnitude <= high) & (magnitude != tie)
    return above, count, inside_total


@njit(cache=True, nogil=True)
def consensus(  # type: ignore[no-untyped-def]
    base, models, shift, thresholds, tie_thresholds, tie_ends, scales, weights, normalize, scaling,
    output, round_to_bf16,
):
    total = base.shape[0]
    model_count = len(models)
    zero = np.float32(0.0)
    plus = np.float32(1.0)
    minus = np.float32(-1.0)
    base_bits, model_bits, base_values, model_values = _chunk_buffers()
    weighted = np.empty((model_count, CHUNK), np.float32)
    summed = np.empty(CHUNK, np.float32)
    signs = np.empty(CHUNK, np.float32)
    mixed_bits = np.empty(CHUNK, np.uint32)
    mixed = mixed_bits.view(np.float32)
    divisor = np.empty(CHUNK, np.float32)
    for start in range(0, total, CHUNK):
        size = min(CHUNK, total - start)
        _load(base, start, size, shift, base_bits)
        for k in range(size):
            summed[k] = zero
            mixed[k] = zero
            divisor[k] = zero
        for j in range(model_count):
            _load(models[j], start, size, shift, model_bits)
            row = weighted[j]
            scale = scales[j]
            weight = weights[j]
            # Entries before the model's tie end are kept when tied with its cut.
            split = min(max(tie_ends[j] - start, 0), size)
            threshold = tie_thresholds[j]
            for k in range(split):
                delta = model_values[k] - base_values[k]
                term = (delta if abs(delta) > threshold else zero) * scale * weight
                row[k] = term
                summed[k] += term
            threshold = thresholds[j]
            # Views from `split` on, so that this loop also indexes from 0 and vectorizes.
            # Indexed from `split`, the kernel took 2.6 times as long on 4 models.
            tail_model = model_values[split:size]
            tail_base = base_values[split:size]
            tail_row = row[split:size]
            tail_summed = summed[split:size]
            for k in range(size - split):
                delta = tail_model[k] - tail_base[k]
                term = (delta if abs(delta) > threshold else zero) * scale * weight
                tail_row[k] = term
                tail_summed[k] += term
        for k in range(size):
            # The elected sign: + where the sum is >= 0 (-0.0 included).
            signs[k] = plus if summed[k] >= zero else minus
        for j in range(model_count):
            row = weighted[j]
            weight = weights[j]
            for k in range(size):
                agrees = row[k] * signs[k] > zero
                mixed[k] += row[k] if agrees else zero
                divisor[k] += weight if agrees else zero
        if normalize:
            for k in range(size):
                mixed[k] = mixed[k] / (plus if divisor[k] == zero else divisor[k])
        for k in range(size):
            mixed[k] = mixed[k] * scaling + base_values[k]
        _store(mixed, mixed_bits, size, output[start : start + size], round_to_bf16)


@njit(cache=True, nogil=True)
def task_arithmetic(base, models, shift, weights, normalize, divisor, scaling, output, round_to_bf16):  # type: ignore[no-untyped-def]
    total = base.shape[0]
    model_count = len(models)
    zero = np.float32(0.0)
    base_bits, model_bits, base_values, model_values = _chunk_buffers()
    mixed_bits = np.empty(CHUNK, np.uint32)
    mixed = mixed_bits.view(np.float32)
    for start in range(0, total, CHUNK):
        size = min(CHUNK, total - start)
        _load(base, start, size, shift, base_bits)
        for k in range(size):
            mixed[k] = zero
        for j in range(model_count):
            _load(models[j], start, size, shift, model_bits)
            weight = weights[j]
            for k in range(size):
                mixed[k] = _fma(model_values[k] - base_values[k], weight, mixed[k])
        if normalize:
            for k in range(size):
                mixed[k] = mixed[k] / divisor
        for k in range(size):
            mixed[k] = mixed[k] * scaling + base_values[k]
        _store(mixed, mixed_bits, size, output[start : start + size], round_to_bf16)
