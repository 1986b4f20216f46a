// The join page: reads the invite from the URL fragment (never sent to a server), makes this tab a mesh
// member (member.js) and chats with the mesh's models through the node that served the page (same origin:
// POST /v1/chat/completions, streamed as server-sent events), showing the route each answer took.
import { MeshError, loadIdentity, parseInvite } from "./mesh.js";
import { Member } from "./member.js";
import { Compute } from "./serve.js";

const $ = (id) => document.getElementById(id);
let member = null;

function short(id) {
  return id ? `${id.slice(0, 12)}…` : "";
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function render() {
  const { state, code, reason } = member.status;
  const count = member.links.size;
  if (state === "linked" || (state === "joining" && count)) setStatus("linked", `member of mesh ${member.membership.mesh} · ${count} link(s)`);
  else if (state === "refused") setStatus("refused", `refused (${code}): ${reason}`);
  else setStatus(state, state === "joining" ? "joining…" : `${state}${reason ? `: ${reason}` : ""}`);
  const rows = member.members().map((m) => {
    const row = document.createElement("tr");
    row.dataset.id = m.id;
    row.dataset.kind = m.kind;
    for (const text of [m.name, m.kind, short(m.id), m.rtt_ms === null ? "" : `${m.rtt_ms.toFixed(1)} ms`, m.models.map((x) => (typeof x === "string" ? x : x?.name ?? "")).join(", ")]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  $("members").tBodies[0].replaceChildren(...rows);
  const via = member.links.get(member.status.via);
  if (via) $("via").textContent = via.name;
  if (member.status.state === "linked" && member.compute?.state === "idle") startCompute();  // members only
}

const COMPUTE_TEXT = {
  idle: "not started", off: "off: this tab does not serve the mesh", fetching: "fetching the model",
  loading: "loading the model", warming: "measuring this tab's speed", ready: "serving", error: "failed",
  unavailable: "no compute",
};

function renderCompute() {
  const compute = member.compute;
  const { state, detail, progress, job, served } = compute;
  const shown = !compute.serve && state !== "unavailable" ? "off" : state;
  const speed = state === "ready" && compute.speed  // what the advert says now (warm-up, then served requests)
    ? `${compute.speed.decode_tok_s.toFixed(1)} tok/s decode, ${compute.speed.prefill_tok_s.toFixed(1)} tok/s prefill (wasm, 1 thread)` : detail;
  $("compute-status").dataset.state = shown;
  $("compute-status").textContent = `${COMPUTE_TEXT[shown] ?? shown}${speed && shown !== "off" ? ` — ${speed}` : ""}`
    + (job ? " · serving a request" : "");
  $("serve").checked = compute.serve;
  $("serve").disabled = state === "unavailable";
  const bar = $("compute-progress");
  bar.hidden = state !== "fetching" || !progress;
  if (progress && progress[1]) bar.value = progress[0] / progress[1];
  const battery = compute.battery ? ` · battery ${compute.battery.level}%${compute.battery.charging ? " (charging)" : ""}` : "";
  const done = served.filter((r) => r.finish && r.finish !== "cancelled" && r.finish !== "error");
  $("compute-served").textContent = `${done.length} request(s) served for the mesh${battery}`;
}

function startCompute() {
  if (member.compute.serve) member.compute.start(headers());
}

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    const ids = (body.data ?? []).map((m) => m.id).filter((id) => typeof id === "string");
    $("model").replaceChildren(...ids.map((id) => Object.assign(document.createElement("option"), { value: id, textContent: id })));
  } catch (error) {
    console.info("no model list", error);
  }
}

function describeRoute(route, header) {
  if (!route) return `route: ${header ?? "?"}`;
  const names = new Map(member.members().map((m) => [m.id, m.name]));
  const via = member.links.get(member.status.via)?.name ?? "the linked node";
  const hops = (route.peers ?? []).map((p, i) => {
    const who = p === "local" ? via : names.get(p) ?? short(p);
    return route.spans?.[i] ? `${who} [${route.spans[i]}]` : who;
  });
  if (route.kind === "local") return `route: local — answered by ${via}`;
  return `route: ${route.kind} — ${via} → ${hops.join(" → ")}`;
}

async function chat(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  $("route").textContent = "";
  const body = { model: $("model").value, messages: [{ role: "user", content: prompt }], stream: true, max_tokens: 64,
    temperature: 0 };  // greedy: small models answer best so
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new MeshError(error.error?.message ?? response.statusText, error.error?.code ?? String(response.status));
    }
    const header = response.headers.get("x-shoal-route");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let route = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new MeshError(chunk.error.message, chunk.error.code ?? "error");
        const text = chunk.choices?.[0]?.delta?.content;
        if (text) answer.textContent += text;
        if (chunk.shoal_route) route = chunk.shoal_route;
      }
    }
    $("route").textContent = describeRoute(route, header);
    answer.dataset.state = "done";
  } catch (error) {
    answer.dataset.state = "error";
    $("route").textContent = `chat failed (${error.code ?? "error"}): ${error.message}`;
  }
}

async function start() {
  let fragment = location.hash.slice(1);
  try {
    fragment = decodeURIComponent(fragment);
  } catch {
    // not percent-encoded: parseInvite says what is wrong with it
  }
  if (!fragment) {
    $("invite-box").hidden = false;
    setStatus("no-invite", "no invite in this page's address");
    return;
  }
  let membership;
  try {
    membership = await parseInvite(fragment);
  } catch (error) {
    $("invite-box").hidden = false;
    setStatus("error", `bad invite: ${error.message}`);
    return;
  }
  const identity = await loadIdentity();
  $("self-name").textContent = identity.name;
  $("self-id").textContent = identity.id;
  member = new Member(identity, membership);
  window.shoalMember = member;  // for tests and the console
  member.addEventListener("change", render);
  const compute = new Compute();
  member.useCompute(compute);
  compute.addEventListener("change", renderCompute);
  compute.watchBattery();
  renderCompute();
  window.addEventListener("pagehide", () => member.leave());
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  try {
    await member.join(`${scheme}//${location.host}/v1/mesh/signal`);
  } catch (error) {
    console.warn("join failed", error);
  }
  render();
  loadModels();
}

$("invite-form").addEventListener("submit", (event) => {
  event.preventDefault();
  location.hash = $("invite").value.trim();
  location.reload();
});
$("chat-form").addEventListener("submit", chat);
$("api-key").addEventListener("change", () => {  // a node with [api] key lists (and serves) its models only then
  loadModels();
  if (member?.compute?.state === "error") startCompute();
});
$("serve").addEventListener("change", (event) => {
  member?.compute?.setServe(event.target.checked);
  if (event.target.checked && member?.status.state === "linked" && ["idle", "error"].includes(member.compute.state)) startCompute();
});
start();
