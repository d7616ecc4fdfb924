// Blossom's web UI: a prompt, the generation parameters, and the continuation streamed from
// POST /generate_stream (text-generation-inference's server-sent events) as it is made.
// Stopping aborts the fetch; the server sees the connection close and cancels the sequence.
"use strict";

const $ = (id) => document.getElementById(id);
const storageKey = "blossom.parameters.v1";

const numberFields = ["max_new_tokens", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "seed"];
const rangeFields = ["temperature", "top_p", "typical_p", "repetition_penalty"];
const defaults = Object.fromEntries([
  ...numberFields.map((name) => [name, $(name).value]),
  ["do_sample", $("do_sample").checked],
  ["stop_sequences", $("stop_sequences").value],
]);

let controller = null;

// ---- parameters -------------------------------------------------------------------------------

function showRangeValues() {
  for (const name of rangeFields) $(`${name}-value`).textContent = $(name).value;
  $("sampling").disabled = !$("do_sample").checked;
}

function saveParameters() {
  const saved = Object.fromEntries(numberFields.map((name) => [name, $(name).value]));
  saved.do_sample = $("do_sample").checked;
  saved.stop_sequences = $("stop_sequences").value;
  try {
    localStorage.setItem(storageKey, JSON.stringify(saved));
  } catch {
    // Private browsing may refuse storage; the page works without it.
  }
}

function applyParameters(values) {
  for (const name of numberFields) if (values[name] !== undefined) $(name).value = values[name];
  if (values.do_sample !== undefined) $("do_sample").checked = values.do_sample;
  if (values.stop_sequences !== undefined) $("stop_sequences").value = values.stop_sequences;
  showRangeValues();
}

function loadParameters() {
  try {
    const saved = JSON.parse(localStorage.getItem(storageKey) || "null");
    if (saved && typeof saved === "object") applyParameters(saved);
  } catch {
    // Ignore what cannot be read.
  }
  showRangeValues();
}

/** The `parameters` object of a TGI request, from the form. */
function requestParameters() {
  const int = (name) => Number.parseInt($(name).value, 10);
  const float = (name) => Number.parseFloat($(name).value);
  const parameters = {
    max_new_tokens: int("max_new_tokens"),
    details: true,
  };
  const penalty = float("repetition_penalty");
  if (penalty !== 1) parameters.repetition_penalty = penalty;
  const ngram = int("no_repeat_ngram_size");
  if (ngram > 0) parameters.no_repeat_ngram_size = ngram;
  const stop = $("stop_sequences").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) parameters.stop = stop;
  if ($("do_sample").checked) {
    parameters.do_sample = true;
    parameters.temperature = float("temperature");
    const topK = int("top_k");
    if (topK > 0) parameters.top_k = topK;
    const topP = float("top_p");
    if (topP < 1) parameters.top_p = topP;
    const typicalP = float("typical_p");
    if (typicalP < 1) parameters.typical_p = typicalP;
    const seed = $("seed").value.trim();
    if (seed !== "") parameters.seed = Number.parseInt(seed, 10);
  }
  return parameters;
}

// ---- server status ------------------------------------------------------------------------------

async function refreshStatus() {
  const status = $("status");
  try {
    const info = await (await fetch("/info")).json();
    $("model").textContent = `${info.model_id} · ${info.model_dtype ?? "?"} · ${info.strategy}`;
    const maxNew = info.allowed_max_new_tokens;
    if (maxNew) $("max_new_tokens").max = String(maxNew);
    const health = await fetch("/health");
    if (health.ok) {
      status.textContent = "ready";
      status.className = "status ready";
      return true;
    }
    const body = await health.json().catch(() => ({}));
    status.textContent = body.state === "loading" ? "loading model" : body.state || "unavailable";
    status.className = "status loading";
  } catch {
    status.textContent = "offline";
    status.className = "status down";
  }
  return false;
}

async function watchStatus() {
  const ready = await refreshStatus();
  setTimeout(watchStatus, ready ? 15000 : 2000);
}

// ---- generation ---------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  $("cursor").hidden = !running;
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** Reads server-sent events from a fetch response; calls onEvent with each parsed `data:` payload. */
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) onEvent(JSON.parse(line.slice(5)));
      }
    }
  }
}

async function generate() {
  if (controller) return;
  showError("");
  const continuing = $("append").checked && $("generated").textContent.length > 0;
  const inputs = continuing ? $("prompt-echo").textContent + $("generated").textContent : $("prompt").value;
  if (inputs.length === 0) {
    showError("Type a prompt first.");
    $("prompt").focus();
    return;
  }
  saveParameters();
  const parameters = requestParameters();
  $("prompt-echo").textContent = inputs;
  const generated = $("generated");
  generated.textContent = "";
  $("token-count").textContent = "0";
  $("tokens-per-second").textContent = "–";
  $("ttft").textContent = "–";
  $("finish-reason").textContent = "generating…";
  setRunning(true);

  controller = new AbortController();
  const started = performance.now();
  let firstAt = 0;
  let count = 0;
  let finish = "";
  try {
    const response = await fetch("/generate_stream", {
      method: "POST",
      headers: { "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify({ inputs, parameters }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || `the server answered ${response.status}`);
    }
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error);
      const now = performance.now();
      count++;
      if (count === 1) {
        firstAt = now;
        $("ttft").textContent = formatMs(now - started);
      }
      if (!event.token.special) generated.append(event.token.text);
      // The last event's generated_text is the whole output: it includes text held back until the
      // end (a possible stop string, an incomplete character) even when the last token is </s>.
      if (typeof event.generated_text === "string") generated.textContent = event.generated_text;
      $("token-count").textContent = String(count);
      if (count > 1) $("tokens-per-second").textContent = ((count - 1) / ((now - firstAt) / 1000)).toFixed(1);
      if (event.details) finish = event.details.finish_reason;
    });
    $("finish-reason").textContent = finish ? `done (${finish.replace("_", " ")})` : "done";
  } catch (err) {
    if (err.name === "AbortError") $("finish-reason").textContent = "stopped";
    else {
      $("finish-reason").textContent = "error";
      showError(err.message);
    }
  } finally {
    controller = null;
    setRunning(false);
  }
}

function stop() {
  if (controller) controller.abort();
}

// ---- wiring -------------------------------------------------------------------------------------

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", () => {
  $("prompt-echo").textContent = "";
  $("generated").textContent = "";
  $("finish-reason").textContent = "idle";
  showError("");
});
$("reset").addEventListener("click", () => {
  applyParameters(defaults);
  saveParameters();
});
$("do_sample").addEventListener("change", () => {
  showRangeValues();
  saveParameters();
});
for (const name of rangeFields) $(name).addEventListener("input", showRangeValues);
for (const name of [...numberFields, "stop_sequences"]) $(name).addEventListener("change", saveParameters);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    generate();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") stop();
});

loadParameters();
watchStatus();
