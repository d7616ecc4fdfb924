/**
 * Run under mpirun by test/tensor-parallel.test.ts: each rank asks for a different KV-cache size
 * (rank r: 512 / (r + 1) tokens); rank 0 prints the capacity the ranks agreed on and fills it with
 * one sequence (block ids past a smaller rank's cache would have read and written outside it).
 */
import { loadModel } from "../../src/index.js";
import { fixtureDir } from "./fixtures.js";

const rank = Number(process.env.OMPI_COMM_WORLD_RANK ?? 0);
const model = await loadModel(fixtureDir("tiny-bloom-a"), { strategy: "tensor", kvCacheTokens: 512 / (rank + 1) });
const capacity = model.info.kvCacheTokens;
const r = await model.generate([[5, 6, 7, 8]], { maxNewTokens: capacity - 4, minNewTokens: capacity - 4 });
process.stdout.write(JSON.stringify({ capacity, generated: r.tokenIds[0]!.length }) + "\n");
await model.dispose();
