/**
 * ALiBi slopes (Press et al., "Train Short, Test Long"), as BLOOM builds them in
 * transformers' build_alibi_tensor: for the closest power of two c <= n_head, slope_i = 2^(-8i/c),
 * i = 1..c; the remaining heads take every other slope of the 2c-head sequence, 2^(-4(2j+1)/c).
 */
export function alibiSlopes(numHeads: number): Float32Array {
  const closest = 2 ** Math.floor(Math.log2(numHeads));
  const slopes: number[] = [];
  for (let i = 1; i <= closest; i++) slopes.push(2 ** ((-8 * i) / closest));
  for (let j = 0; j < numHeads - closest; j++) slopes.push(2 ** ((-4 * (2 * j + 1)) / closest));
  return Float32Array.from(slopes);
}
