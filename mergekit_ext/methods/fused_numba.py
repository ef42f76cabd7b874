"""The numba kernels behind `fused` (imported only through it, since importing numba takes about 0.3 s).

Inputs arrive as bit patterns, uint16 for bf16 and uint32 for float32, which `_to_float`
turns into float32 values inside the loops. Every loop indexes an array or a view from
0, so that numba's wraparound check for negative indices drops out and the loops
vectorize. Compiled code is cached on
disk by numba (`cache=True`), so only the first run on a machine compiles.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mergekit_ext.methods.fused import CHUNK, GROUP

# `not abs(x) <= FLOAT32_MAX` is true exactly for infinite and NaN x, because every
# comparison with NaN is false.
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


@intrinsic
def _fma(typing_context, a, b, c):  # type: ignore[no-untyped-def]
    # This computes a * b + c with one rounding, as torch's add with alpha does on CPU.
    signature = types.float32(types.float32, types.float32, types.float32)

    def generate(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
        return builder.fma(*arguments)

    return signature, generate


@intrinsic
def _to_float(typing_context, bits):  # type: ignore[no-untyped-def]
    # The float32 value of a bf16 (uint16) or float32 (uint32) bit pattern: a bf16 is the
    # upper half of the float32 with the same value.
    if bits == types.uint16:

        def generate(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
            wide = builder.zext(arguments[0], ir.IntType(32))
            return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    else:

        def generate(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
            return builder.bitcast(arguments[0], ir.FloatType())

    return types.float32(bits), generate


@intrinsic
def _tally(typing_context, count, flag):  # type: ignore[no-untyped-def]
    # Adds a boolean to a count of the count's own integer type. numba widens integer sums
    # to int64, and with int64 counters LLVM vectorized the selection pass with four lanes
    # instead of eight, which made it 2.7 times slower on the 136M-entry embedding table
    # of Qwen2-0.5B (187 ms against 70 ms). An unsigned index also drops the check for
    # negative indices, which took a third of the time of collecting the band's entries.
    def generate(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
        total, condition = arguments
        return builder.add(total, builder.zext(condition, total.type))

    return count(count, types.boolean), generate


@intrinsic
def _float_bits(typing_context, value):  # type: ignore[no-untyped-def]
    # The bit pattern of a float32, as a uint32.
    def generate(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
        return builder.bitcast(arguments[0], ir.IntType(32))

    return types.uint32(types.float32), generate


@njit(inline="always")
def _output_bits(value, round_to_bf16):  # type: ignore[no-untyped-def]
    # A bf16 output gets the float32 rounded to the nearest even bf16 and NaN as 0xFFFF,
    # as torch's conversion does. A float32 output gets its bits.
    pattern = _float_bits(value)
    if not round_to_bf16:
        return pattern
    rounded = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint32(0xFFFF) if value != value else rounded


@njit(cache=True, nogil=True)
def magnitudes_at(model, base, positions, output):  # type: ignore[no-untyped-def]
    for k in range(positions.shape[0]):
        position = positions[k]
        output[k] = abs(_to_float(model[position]) - _to_float(base[position]))


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
def band(model, base, low, high, tie, values, positions, chunk_ties):  # type: ignore[no-untyped-def]
    total = base.shape[0]
    capacity = values.shape[0] - GROUP
    magnitudes = np.empty(CHUNK, np.float32)
    members = np.empty(CHUNK // GROUP + 1, np.int64)
    above = 0
    count = np.uint64(0)
    inside_total = 0
    non_finite = 0
    for start in range(0, total, CHUNK):
        size = min(CHUNK, total - start)
        base_chunk = base[start : start + size]
        model_chunk = model[start : start + size]
        # Count per group of GROUP entries (a fixed trip count, so the loop vectorizes),
        # then collect from the groups that have members only. Entries equal to `tie`
        # are counted per chunk and not collected.
        groups = size // GROUP
        inside = 0
        ties = 0
        for group in range(groups + 1):
            first = group * GROUP
            group_above = np.int32(0)
            group_inside = np.int32(0)
            group_ties = np.int32(0)
            group_non_finite = np.int32(0)
            if group < groups:
                group_model = model_chunk[first : first + GROUP]
                group_base = base_chunk[first : first + GROUP]
                group_magnitudes = magnitudes[first : first + GROUP]
                for k in range(GROUP):
                    magnitude = abs(_to_float(group_model[k]) - _to_float(group_base[k]))
                    group_magnitudes[k] = magnitude
                    group_non_finite = _tally(group_non_finite, not magnitude <= FLOAT32_MAX)
                    is_above = magnitude > high
                    is_tie = magnitude == tie
                    group_above = _tally(group_above, is_above)
                    group_ties = _tally(group_ties, is_tie)
                    group_inside = _tally(group_inside, (magnitude >= low) & (not is_above) & (not is_tie))
            else:
                for k in range(first, size):
                    magnitude = abs(_to_float(model_chunk[k]) - _to_float(base_chunk[k]))
                    magnitudes[k] = magnitude
                    group_non_finite = _tally(group_non_finite, not magnitude <= FLOAT32_MAX)
                    is_above = magnitude > high
                    is_tie = magnitude == tie
                    group_above = _tally(group_above, is_above)
                    group_ties = _tally(group_ties, is_tie)
                    group_inside = _tally(group_inside, (magnitude >= low) & (not is_above) & (not is_tie))
            above += group_above
            ties += group_ties
            non_finite += group_non_finite
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
                count = _tally(count, (magnitude >= low) & (magnitude <= high) & (magnitude != tie))
    return above, count, inside_total, non_finite


@njit(cache=True, nogil=True)
def consensus(  # type: ignore[no-untyped-def]
    base, models, thresholds, tie_thresholds, tie_ends, scales, weights, normalize, scaling, output, round_to_bf16,
):
    # One pass per entry over all models, with every sum in a register. The per-model
    # parameters are tuples, so they stay in registers too. As arrays, which LLVM cannot
    # prove the output does not alias, they would be gathered from memory on every entry.
    # The sums of positive and of negative terms equal, bit for bit, the sums of the
    # terms that agree with the elected sign, which the torch path adds in model order.
    total = base.shape[0]
    model_count = len(models)
    zero = np.float32(0.0)
    plus = np.float32(1.0)
    for k in range(total):
        base_value = _to_float(base[k])
        summed = zero
        positive = zero
        negative = zero
        positive_weight = zero
        negative_weight = zero
        for j in range(model_count):
            delta = _to_float(models[j][k]) - base_value
            # Entries before the model's tie end are kept when tied with its cut.
            threshold = tie_thresholds[j] if k < tie_ends[j] else thresholds[j]
            weight = weights[j]
            term = (delta if abs(delta) > threshold else zero) * scales[j] * weight
            summed += term
            positive += term if term > zero else zero
            positive_weight += weight if term > zero else zero
            negative += term if term < zero else zero
            negative_weight += weight if term < zero else zero
        # The elected sign: + where the sum is >= 0 (-0.0 included).
        elected = summed >= zero
        mixed = positive if elected else negative
        if normalize:
            divisor = positive_weight if elected else negative_weight
            mixed = mixed / (plus if divisor == zero else divisor)
        output[k] = _output_bits(mixed * scaling + base_value, round_to_bf16)


@njit(cache=True, nogil=True)
def task_arithmetic(base, models, weights, normalize, divisor, scaling, output, round_to_bf16):  # type: ignore[no-untyped-def]
    # Returns True when an output entry is NaN or infinite, as it is wherever an input is.
    total = base.shape[0]
    model_count = len(models)
    magnitude_bits = np.uint32(0x7FFF) if round_to_bf16 else np.uint32(0x7FFFFFFF)
    largest = np.uint32(0)
    for k in range(total):
        base_value = _to_float(base[k])
        mixed = np.float32(0.0)
        for j in range(model_count):
            mixed = _fma(_to_float(models[j][k]) - base_value, weights[j], mixed)
        if normalize:
            mixed = mixed / divisor
        pattern = _output_bits(mixed * scaling + base_value, round_to_bf16)
        output[k] = pattern
        largest = max(largest, pattern & magnitude_bits)
    return largest >= (np.uint32(0x7F80) if round_to_bf16 else np.uint32(0x7F800000))
