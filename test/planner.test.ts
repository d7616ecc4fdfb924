/** Pipeline placement against hand-computed expectations for each mode and budget. */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { loadModel } from "../src/index.js";
import { fixtureDir } from "./helpers/fixtures.js";
import { BlossomError } from "../src/errors.js";
import { parseMaxMemory, planPlacement, type DeviceId, type PlannedModule } from "../src/parallel/planner.js";

// Embeddings 100, six blocks of 20, two norms of 1, a head tied to the embeddings: 222 in all.
const modules: PlannedModule[] = [
  { name: "word_embeddings", bytes: 100 },
  { name: "word_embeddings_layernorm", bytes: 1 },
  ...Array.from({ length: 6 }, (_, i) => ({ name: `h.${i}`, bytes: 20 })),
  { name: "ln_f", bytes: 1 },
  { name: "lm_head", bytes: 0, tiedTo: "word_embeddings" },
];

function placed(plan: ReturnType<typeof planPlacement>): Record<string, DeviceId[]> {
  const out: Record<string, DeviceId[]> = {};
  for (const [name, device] of plan.placement) (out[String(device)] ??= []).push(name as DeviceId);
  return out;
}

describe("planner", () => {
  test("parses --max-memory", () => {
    const m = parseMaxMemory("0:2GiB, 1:1.5GiB,cpu:512MB,disk");
    assert.deepEqual([...m.entries()], [[0, 2 * 2 ** 30], [1, 1.5 * 2 ** 30], ["cpu", 512e6], ["disk", Infinity]]);
    assert.throws(() => parseMaxMemory("gpu:1GiB"), /"gpu" is not a device/);
    assert.throws(() => parseMaxMemory("0"), /device 0 needs a size/);
    assert.throws(() => parseMaxMemory("0:1GiB,0:2GiB"), /listed twice/);
    assert.throws(() => parseMaxMemory("0:lots"), /--max-memory 0/);
    assert.throws(() => parseMaxMemory("cpu:1GiB,disk:1KiB"), /disk takes no size/);
    assert.throws(() => parseMaxMemory("99999999999999999999:1GiB"), /is not a device/);
  });

  test("sequential: device 0 keeps room for the largest remaining layer, the rest spills to device 1", () => {
    // Device 0 (main) keeps 20 free for a block: embeddings 100 + norm 1 + h.0 20 = 121 <= 130; h.1 would be 141.
    const plan = planPlacement(modules, parseMaxMemory("0:150B,1:150B,cpu:100B"), "sequential");
    assert.deepEqual(placed(plan), {
      "0": ["word_embeddings", "lm_head", "word_embeddings_layernorm", "h.0"],
      "1": ["h.1", "h.2", "h.3", "h.4", "h.5", "ln_f"],
    });
    assert.equal(plan.bytesPerDevice.get(0), 121);
    assert.equal(plan.bytesPerDevice.get(1), 101);
    assert.equal(plan.bytesPerDevice.get("cpu"), 0);
  });

  test("balanced: device 0 is capped at total/2 + 1.25 x block = 111 + 25 = 136", () => {
    const plan = planPlacement(modules, parseMaxMemory("0:150B,1:150B"), "balanced");
    assert.equal(plan.budgets.get(0), 136);
    assert.equal(plan.budgets.get(1), 150); // the last device keeps its whole budget
    assert.deepEqual(placed(plan), {
      "0": ["word_embeddings", "lm_head", "word_embeddings_layernorm"],
      "1": ["h.0", "h.1", "h.2", "h.3", "h.4", "h.5", "ln_f"],
    });
    // auto is balanced, as in transformers' from_pretrained.
    assert.deepEqual(placed(planPlacement(modules, parseMaxMemory("0:150B,1:150B"), "auto")), placed(plan));
  });

  test("balanced_low_0: device 0 only gets what devices 1..n cannot hold", () => {
    // per device = 222/2 + 25 = 136 for devices 1..n-1; device 0 = max(0, 222 - (136 + 150)) = 0.
    const plan = planPlacement(modules, parseMaxMemory("0:150B,1:150B,2:150B"), "balanced_low_0");
    assert.equal(plan.budgets.get(0), 0);
    assert.equal(plan.budgets.get(1), 136);
    assert.deepEqual(placed(plan), {
      "1": ["word_embeddings", "lm_head", "word_embeddings_layernorm", "h.0"],
      "2": ["h.1", "h.2", "h.3", "h.4", "h.5", "ln_f"],
    });
  });

  test("cpu and disk offload: what fits nowhere goes to cpu, then disk", () => {
    const plan = planPlacement(modules, parseMaxMemory("0:130B,cpu:45B,disk"), "sequential");
    // 0: 100 + 1 (room kept: 20) ; cpu (main, keeps 20): h.0 = 20 <= 25, h.1 = 40 > 25 -> disk.
    assert.deepEqual(placed(plan), {
      "0": ["word_embeddings", "lm_head", "word_embeddings_layernorm"],
      cpu: ["h.0"],
      disk: ["h.1", "h.2", "h.3", "h.4", "h.5", "ln_f"],
    });
  });

  test("no room and no disk: a clear error naming the module", () => {
    assert.throws(
      () => planPlacement(modules, parseMaxMemory("0:130B,cpu:45B"), "sequential"),
      (err: unknown) => err instanceof BlossomError && /cannot place h\.1 \(20 B\)/.test(err.message) && /disk/.test(err.message),
    );
  });
});

describe("blossom plan shows the placement a pipeline load makes", () => {
  const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
  const model = fixtureDir("trained-bloom-small");
  const planOutput = (budget: string) => spawnSync(process.execPath, [cli, "plan", "-m", model, "--max-memory", budget], { encoding: "utf8", timeout: 60_000 });

  test("a cpu budget the process's own memory uses up is refused by plan as by the load", async () => {
    const r = planOutput("cpu:100MiB");
    assert.equal(r.status, 1);
    assert.match(r.stderr, /cannot place word_embeddings .* less 100\.0 MiB for this process's own memory/);
    await assert.rejects(loadModel(model, { strategy: "pipeline", maxMemory: "cpu:100MiB" }), /less 100\.0 MiB for this process's own memory/);
  });

  test("the layers plan puts on disk are the ones the load streams from disk", async () => {
    const budget = "0:4MiB,1:2MiB,cpu:3.5MiB,disk";
    const r = planOutput(budget);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /cpu: 3\.5 MiB given, 0 B left for weights after this process's own memory and the read-ahead buffers/);
    const disk = /^disk\s+-\s+\S+ \S+\s+(.*)$/m.exec(r.stdout)![1]!;
    const layers = disk.split(", ").flatMap((part) => {
      const range = /^h\.(\d+)-h\.(\d+)$/.exec(part);
      if (range) return Array.from({ length: Number(range[2]) - Number(range[1]) + 1 }, (_, i) => `h.${Number(range[1]) + i}`);
      return /^h\.\d+$/.test(part) ? [part] : [];
    });
    const m = await loadModel(model, { strategy: "pipeline", maxMemory: budget });
    try {
      assert.equal((await m.stats()).offload?.diskLayers, layers.length, r.stdout);
    } finally {
      await m.dispose();
    }
  });
});

describe("plan and load reserve the same for the process, whatever it holds at the moment", () => {
  test("a checkpoint with a large tokenizer.json: plan and the load refuse a budget alike, naming the same figures", async () => {
    // The reservation is estimated from the files (runtime + 13x tokenizer.json), so padding the
    // tokenizer file moves both the same way, while the processes' resident sizes differ.
    const dir = mkdtempSync(join(tmpdir(), "blossom-plan-tokenizer-"));
    try {
      const source = fixtureDir("trained-bloom-small");
      for (const f of readdirSync(source)) if (f !== "golden" && f !== "tokenizer.json") copyFileSync(join(source, f), join(dir, f));
      writeFileSync(join(dir, "tokenizer.json"), readFileSync(join(source, "tokenizer.json"), "utf8") + " ".repeat(10 * 2 ** 20));
      const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
      const budget = "cpu:254MiB";
      const r = spawnSync(process.execPath, [cli, "plan", "-m", dir, "--max-memory", budget, "--placement", "sequential"], { encoding: "utf8", timeout: 60_000 });
      assert.equal(r.status, 1, r.stdout);
      const planned = /cannot place .*/.exec(r.stderr)![0];
      await assert.rejects(loadModel(dir, { strategy: "pipeline", maxMemory: budget, placement: "sequential" }), (err: Error) => {
        assert.equal(err.message, planned);
        return true;
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
