// The tab serves too: it fetches the default model by CID from its node (ipfs.js, every block verified), runs
// it with wllama (llama.cpp built to WebAssembly, vendored by scripts/install_wllama.sh under
// /join/vendor/wllama/) and answers `offload.open` like a native node's OffloadServer (mesh/split/offload.py,
// frames in mesh/split/wire.py): one request at a time, from the origin's token ids, greedy or sampled by
// llama.cpp's own sampler. Its measured speed, the serve switch and the battery go in the tab's advert.
import { fetchFile } from "./ipfs.js";
import { cached, keep } from "./kept.js";
import { MeshError } from "./mesh.js";

export const MODEL = "smollm2-135m-instruct";  // the embedded default (mesh/ipfs/catalog.py EMBEDDED_NAME)
const WLLAMA = "/join/vendor/wllama/index.js";
const WASM = "/join/vendor/wllama/wllama.wasm";
const N_CTX = 4096;
const MAX_MODEL_BYTES = 1 << 30;
const MAX_PROMPT_IDS = 16384;  // as mesh/split/offload.py
const MAX_PREFILL_S = 45;  // the origin waits 60 s ([split] offload_token_timeout_s) for the first token
const BATTERY_FLOOR = 20;  // percent, as a native node's [policy] battery_floor default
const RETRY_FIRST_MS = 5000;
const RETRY_MAX_MS = 60000;
const WARM_PROMPT = 16;
const WARM_DECODE = 8;
const PARAMS = {  // the fields of models.sampling.SamplingParams and their defaults
  max_tokens: null, temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0, repetition_penalty: 1.0,
  presence_penalty: 0.0, frequency_penalty: 0.0, seed: null, stop: [], logprobs: null, constraint: null,
};

const isInt = (v) => Number.isInteger(v);
const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

/** The offload.open params checked as SamplingParams checks them (`bad_request`), and those this engine
 * does not apply refused (`refused`: the origin plans again without this tab). */
export function checkParams(params) {
  const bad = (message) => { throw new MeshError(`bad sampling parameters: ${message}`, "bad_request"); };
  const refuse = (message) => { throw new MeshError(`this browser member ${message}`, "refused"); };
  if (params === null || typeof params !== "object" || Array.isArray(params)) bad("params must be an object");
  // a field this page does not know (an origin of a newer shoal): another member may apply it
  for (const key of Object.keys(params)) if (!(key in PARAMS)) refuse(`does not know the parameter '${key.slice(0, 40)}'`);
  const p = { ...PARAMS, ...params };
  if (p.max_tokens !== null && !(isInt(p.max_tokens) && p.max_tokens >= 1)) bad("max_tokens must be a positive integer");
  for (const [key, lo, hi] of [["temperature", 0, 2], ["top_p", 0, 1], ["min_p", 0, 1], ["repetition_penalty", 0, 10],
    ["presence_penalty", -2, 2], ["frequency_penalty", -2, 2]]) {
    if (!isNumber(p[key]) || p[key] < lo || p[key] > hi) bad(`${key} must be a number between ${lo} and ${hi}`);
  }
  if (p.top_p <= 0) bad("top_p must be greater than 0 and at most 1");
  if (!isInt(p.top_k) || p.top_k < 0) bad("top_k must be a non-negative integer (0 turns it off)");
  if (p.seed !== null && !(isInt(p.seed) && p.seed >= 0)) bad("seed must be a non-negative integer");
  const stop = typeof p.stop === "string" ? [p.stop] : p.stop;
  if (!Array.isArray(stop) || stop.length > 8 || !stop.every((s) => typeof s === "string" && s)) bad("stop must be up to 8 non-empty strings");
  if (p.logprobs !== null && !(isInt(p.logprobs) && p.logprobs >= 0 && p.logprobs <= 20)) bad("logprobs must be an integer between 0 and 20");
  if (p.constraint !== null && (typeof p.constraint !== "object" || Array.isArray(p.constraint))) bad("constraint must be {kind, spec}");
  if (stop.length) refuse("does not apply stop strings");
  if (p.logprobs !== null) refuse("does not report logprobs");
  if (p.constraint !== null) refuse("does not apply grammars (structured output)");
  if (p.repetition_penalty !== 1 || p.presence_penalty !== 0 || p.frequency_penalty !== 0) refuse("does not apply shoal's penalties");
  if (p.seed !== null && p.temperature > 0) refuse("cannot reproduce a seeded sample");
  return p;
}

function meteredByDefault() {
  const connection = navigator.connection;
  return Boolean(connection && (connection.saveData || connection.type === "cellular"));
}

export class Compute extends EventTarget {
  /** `wllama`: where the vendored module is (tests point it elsewhere). */
  constructor({ wllama = WLLAMA } = {}) {
    super();
    this.wllamaUrl = wllama;
    this.state = "idle";  // idle, unavailable, off, fetching, loading, warming, ready, error
    this.detail = "";
    this.progress = null;  // [bytes, total] while fetching
    this.wllama = null;
    this.cid = null;
    this.fromCache = false;  // the model came from this browser's IndexedDB (fetched and verified before)
    this.speed = null;  // {decode_tok_s, prefill_tok_s} from the warm-up, then from served requests
    this.job = null;  // the request being served
    this.served = [];  // what this tab served: [{rid, model, prompt_ids, tokens, finish}] (tests read it)
    this.battery = null;  // {level (percent), charging}, where the Battery Status API exists
    // `/join?serve=off#…` (or `on`) decides for this page; else the tab's saved choice; else on, unless the
    // browser says the connection is metered (Save-Data, cellular)
    const asked = new URLSearchParams(location.search).get("serve");
    const saved = globalThis.localStorage?.getItem("shoal.serve");
    if (asked === "on" || asked === "off") this.serve = asked === "on";
    else this.serve = saved === null || saved === undefined ? !meteredByDefault() : saved === "on";
  }

  changed() {
    this.dispatchEvent(new Event("change"));
  }

  set(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.changed();
  }

  async watchBattery() {
    if (typeof navigator.getBattery !== "function") return;
    try {
      const battery = await navigator.getBattery();
      const read = () => {
        this.battery = { level: Math.round(battery.level * 1000) / 10, charging: battery.charging };
        this.changed();
      };
      battery.addEventListener("levelchange", read);
      battery.addEventListener("chargingchange", read);
      read();
    } catch (error) {
      console.info("no battery status", error);
    }
  }

  /** Why this tab refuses work right now, or null. */
  refusal() {
    if (!this.serve) return "this browser member does not serve the mesh (its switch is off)";
    if (this.state !== "ready") return `this browser member's model is not ready (${this.state})`;
    const b = this.battery;
    if (b && !b.charging && b.level < BATTERY_FLOOR) return `battery at ${b.level.toFixed(0)}% is below this tab's floor of ${BATTERY_FLOOR}%`;
    return null;
  }

  /** The advert fields a native node's split service gossips (mesh/split/service.py). */
  advertFields() {
    const ready = this.state === "ready";
    const fields = {
      // batch_cost 1: one request at a time, so each one waiting costs a whole request (scheduler load_factor)
      models: ready ? [MODEL] : [], speed: ready && this.speed ? { [MODEL]: { ...this.speed, batch_cost: 1 } } : {},
      queue_depth: this.job ? 1 : 0,
      split: { serve_others: ready && this.refusal() === null, memory_budget: ready ? memoryBudget() : 0 },
    };
    if (this.battery) Object.assign(fields, { battery: this.battery.level, plugged: this.battery.charging });
    return fields;
  }

  setServe(on) {
    this.serve = Boolean(on);
    globalThis.localStorage?.setItem("shoal.serve", this.serve ? "on" : "off");
    if (!this.serve && this.job) this.job.cancelled = true;
    this.changed();
  }

  /** Load wllama and the model (by its CID, from the node that served the page), then measure its speed. */
  async start(headers) {
    if (["fetching", "loading", "warming", "ready"].includes(this.state)) return;
    this.set("loading", "wllama");  // at once: a second start() while this one awaits must not run too
    let Wllama;
    try {
      ({ Wllama } = await import(this.wllamaUrl));
    } catch (error) {
      this.set("unavailable", "this node does not ship wllama (scripts/install.sh vendors it): the tab joins and chats but does not compute");
      return;
    }
    try {
      this.set("fetching", "finding the model");
      this.cid = await findModel(headers);
      this.set("fetching", `${MODEL} ${this.cid.slice(0, 16)}…`);
      let blob = await cached(this.cid);
      this.fromCache = blob !== null;
      if (blob === null) {
        blob = await fetchFile(this.cid, {
          headers, maxBytes: MAX_MODEL_BYTES,
          onProgress: (bytes, total) => { this.progress = [bytes, total]; this.changed(); },
        });
        await keep(this.cid, blob);
      } else {
        this.progress = [blob.size, blob.size];
      }
      this.set("loading", `${(blob.size / 2 ** 20).toFixed(1)} MiB verified${this.fromCache ? " (kept by this browser)" : ""}`);
      const wllama = new Wllama({ "single-thread/wllama.wasm": new URL(WASM, location.href).href },
        { suppressNativeLog: true, logger: { debug: () => {}, log: () => {}, warn: () => {}, error: console.error } });
      await wllama.loadModel([blob], { n_threads: 1, n_ctx: N_CTX, seed: 0 });
      this.wllama = wllama;
      this.set("warming");
      this.speed = await this.warmUp();
      this.set("ready", `${this.speed.decode_tok_s.toFixed(1)} tok/s decode, ${this.speed.prefill_tok_s.toFixed(1)} tok/s prefill (wasm, 1 thread)`);
    } catch (error) {
      console.warn("compute failed", error);
      let retry = "";
      if (!this.wllama && ["no_model", "unreachable"].includes(error.code)) {
        // the node may still be importing the model into its block store: try again, backing off
        this.retryMs = Math.min((this.retryMs ?? RETRY_FIRST_MS / 2) * 2, RETRY_MAX_MS);
        clearTimeout(this.retryTimer);
        this.retryTimer = setTimeout(() => { if (this.serve && this.state === "error") this.start(headers); }, this.retryMs);
        retry = ` (trying again in ${this.retryMs / 1000} s)`;
      }
      this.set("error", `${error.code ?? "error"}: ${String(error.message).slice(0, 300)}${retry}`);
    }
  }

  /** A short greedy run (prompt of WARM_PROMPT tokens, WARM_DECODE decode steps): this tab's own speed. */
  async warmUp() {
    const prompt = await this.wllama.tokenize("The history of the Roman Empire began when the city of Rome was founded, and it", true);
    const run = await this.measure(prompt.slice(0, WARM_PROMPT), WARM_DECODE);
    return { decode_tok_s: round(run.decode_tok_s), prefill_tok_s: round(run.prefill_tok_s) };
  }

  /** Greedy from `ids` for `steps` tokens, timed (the warm-up; bench/browser_member.py): {tokens,
   * prefill_s, decode_s, prefill_tok_s, decode_tok_s}. Offloads are refused (`busy`) meanwhile. */
  async measure(ids, steps) {
    if (this.job) throw new MeshError("serving an offloaded request", "busy");
    const w = this.wllama;
    this.job = { measuring: true, cancelled: false };
    try {
      await w.kvClear();
      await w.samplingInit({ temp: 0 });
      let start = performance.now();
      await w.decode(ids, {});
      const prefillS = (performance.now() - start) / 1000;
      const tokens = [];
      start = performance.now();
      for (let i = 0; i < steps; i++) {
        const { token } = await w.samplingSample();
        tokens.push(token);
        await w.samplingAccept([token]);
        await w.decode([token], {});
      }
      const decodeS = (performance.now() - start) / 1000;
      await w.kvClear();
      return { tokens, prefill_s: prefillS, decode_s: decodeS, prefill_tok_s: ids.length / prefillS, decode_tok_s: steps / decodeS };
    } finally {
      this.job = null;
    }
  }

  // ----- serving --------------------------------------------------------------------------------------

  /** `offload.open`: validated as a native peer's; the reply, then the tokens as `offload.token` frames. */
  open(link, body) {
    const { rid, model, prompt_ids: ids, params } = body;
    if (!isInt(rid) || rid < 0 || rid >= 2 ** 32) throw new MeshError("offload.open needs a fresh u32 rid", "bad_request");
    if (typeof model !== "string" || !model) throw new MeshError("offload.open needs a model", "bad_request");
    if (!Array.isArray(ids) || ids.length < 1 || ids.length > MAX_PROMPT_IDS || !ids.every(isInt)) {
      throw new MeshError(`prompt_ids must be 1-${MAX_PROMPT_IDS} token ids`, "bad_request");
    }
    const sampling = checkParams(params);
    const refusal = this.refusal();
    if (refusal) throw new MeshError(refusal, "refused");
    if (model !== MODEL && model !== this.cid) throw new MeshError(`this browser member holds only ${MODEL}`, "no_model");
    if (this.job) throw new MeshError("serving an offloaded request already", "busy");
    const vocab = this.wllama.getModelMetadata().hparams.nVocab;
    if (ids.some((t) => t < 0 || t >= vocab)) throw new MeshError(`token ids must be in [0, ${vocab})`, "bad_request");
    const room = N_CTX - ids.length;
    if (room < 1 || (sampling.max_tokens !== null && sampling.max_tokens > room)) {
      throw new MeshError(`prompt + max_tokens exceed this tab's context of ${N_CTX} tokens`, "refused");
    }
    if (this.speed && ids.length / this.speed.prefill_tok_s > MAX_PREFILL_S) {
      throw new MeshError(`a ${ids.length}-token prompt takes this tab longer than ${MAX_PREFILL_S} s`, "refused");
    }
    const job = { link, rid, ids, sampling, maxTokens: Math.min(sampling.max_tokens ?? room, room), cancelled: false };
    this.job = job;
    this.changed();
    setTimeout(() => this.run(job), 0);  // after the reply has gone out
    return { accepted: true };
  }

  cancel(link, body) {
    if (this.job && this.job.link === link && this.job.rid === body.rid) this.job.cancelled = true;
  }

  linkClosed(link) {
    if (this.job && this.job.link === link) this.job.cancelled = true;
  }

  async run(job) {
    const { link, rid, ids, sampling } = job;
    const w = this.wllama;
    const record = { rid, model: MODEL, prompt_ids: ids, tokens: [], finish: null };
    this.served.push(record);
    if (this.served.length > 256) this.served.shift();
    try {
      await w.kvClear();
      await w.samplingInit({
        temp: sampling.temperature, top_k: sampling.top_k, top_p: sampling.top_p, min_p: sampling.min_p,
        penalty_repeat: 1, penalty_freq: 0, penalty_present: 0,
      });
      await w.samplingAccept(ids);
      const started = performance.now();
      await w.decode(ids, {});
      const prefilled = performance.now();
      const decoder = new TextDecoder("utf-8");
      for (let n = 1; !job.cancelled; n++) {
        const { token, piece } = await w.samplingSample();
        let text;
        let finish = null;
        if (w.isTokenEOG(token)) {
          text = decoder.decode();
          finish = "stop";
        } else {
          text = decoder.decode(piece, { stream: true });
          if (n >= job.maxTokens) {
            text += decoder.decode();
            finish = "length";
          }
        }
        if (job.cancelled) break;
        record.tokens.push(token);
        link.notify("offload.token", {
          rid, index: n - 1, token, text, prompt_tokens: ids.length, completion_tokens: n, finish,
        });
        if (finish) {
          record.finish = finish;
          link.notify("offload.done", { rid });
          this.observe(ids.length, (prefilled - started) / 1000, n, (performance.now() - prefilled) / 1000);
          break;
        }
        await w.samplingAccept([token]);
        await w.decode([token], {});
      }
      if (job.cancelled) record.finish = "cancelled";
    } catch (error) {
      console.warn(`offload ${rid} failed`, error);
      record.finish = "error";
      link.notify("offload.error", { rid, code: "internal", message: String(error.message ?? error).slice(0, 500) });
    } finally {
      this.job = null;
      this.changed();
    }
  }

  /** A served request's speed feeds the advertised one (moving average, as mesh/split/plan_inputs.py). */
  observe(promptTokens, prefillS, tokens, decodeS) {
    if (!this.speed) return;
    if (promptTokens >= 8 && prefillS > 0) this.speed.prefill_tok_s = ewma(this.speed.prefill_tok_s, promptTokens / prefillS);
    if (tokens > 1 && decodeS > 0) this.speed.decode_tok_s = ewma(this.speed.decode_tok_s, (tokens - 1) / decodeS);
  }
}

function round(value) {
  return Math.round(value * 1000) / 1000;
}

function ewma(old, value, alpha = 0.3) {
  return round((1 - alpha) * old + alpha * value);
}

/** What the tab offers planners: a quarter of the device memory the browser reports (1 GiB if it says none). */
function memoryBudget() {
  const gib = typeof navigator.deviceMemory === "number" ? navigator.deviceMemory : 4;
  return Math.floor(gib * 2 ** 30 / 4);
}

/** The default model's CID, from the node's model list (GET /v1/ipfs/models). */
async function findModel(headers) {
  const response = await fetch("/v1/ipfs/models", { headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new MeshError(body.error?.message ?? `model list: HTTP ${response.status}`, body.error?.code ?? "unreachable");
  const entry = (Array.isArray(body.models) ? body.models : []).find(
    (m) => Array.isArray(m?.names) && m.names.includes(MODEL) && m.complete === true && typeof m.cid === "string");
  if (!entry) throw new MeshError(`the node does not hold ${MODEL} complete`, "no_model");
  return entry.cid;
}
