// The tab's membership: joins through the node that served the page (its /v1/mesh/signal WebSocket), then
// links to the other members by peer exchange, with offers relayed over links (as mesh/p2p/discovery.py).
import { Link } from "./link.js";
import { MeshError, buildSignal, iceServers, meshIdFor, verifySignal } from "./mesh.js";

const CONNECT_TIMEOUT_MS = 10000;
const GOSSIP_INTERVAL_MS = 10000;
const MAX_EXCHANGED = 64;
const MAX_LINKS = 32;  // as a node's [mesh] max_peers default
const REJOIN_FIRST_MS = 1000;
const REJOIN_MAX_MS = 60000;
const CONCURRENT_DIALS_S = 10;  // as mesh/p2p/link_shared.py

/** Whether a member's existing link stays and a second one to it is closed (mesh/p2p/link_shared.py's
 * keeps_existing_link): crossed dials (a rejoin and a peer exchange) may open in either order at either end,
 * so both ends keep the link whose offer nonce is smaller; a link from a later offer (by the offers' times,
 * not by which link opened first here) replaces one from an earlier offer. */
function keepsExistingLink(existing, incoming) {
  if (Math.abs(incoming.ts - existing.ts) > CONCURRENT_DIALS_S) return existing.ts > incoming.ts;
  return existing.nonce < incoming.nonce;
}

export class Member extends EventTarget {
  constructor(identity, membership, settings = {}) {
    super();
    this.identity = identity;
    this.membership = membership;
    this.settings = { heartbeatMs: 1000, deadMs: 4000, ...settings };
    this.links = new Map();
    this.retiring = new Set();  // links that lost to crossed dials, open until the peer starts the kept one
    this.dialing = new Set();
    this.relayed = new Map();
    this.iceServers = [];  // the invite's STUN/TURN servers (`refreshIceServers`)
    this.status = { state: "joining" };
    this.signalUrl = null;
    this.homeId = null;  // the node that served the page, which the tab keeps a link to (as nodes do with
    this.rejoinMs = REJOIN_FIRST_MS;  // their bootstrap addresses): redialled, backing off, when it drops
    this.rejoinTimer = null;
    this.leaving = false;
    this.compute = null;  // serve.js's Compute where the tab serves (`useCompute`)
    this.lastAdvert = "";
    this.gossipTimer = setInterval(() => this.gossip(), GOSSIP_INTERVAL_MS);
  }

  setStatus(state, extra = {}) {
    this.status = { state, ...extra };
    this.changed();
  }

  changed() {
    this.dispatchEvent(new Event("change"));
  }

  async refreshIceServers() {
    this.iceServers = await iceServers(this.membership);  // TURN credentials last a day: renewed per join
  }

  /** Join through the node at `signalUrl` (the page's own node): a signed offer over its WebSocket. On
   * failure, and when that link drops later, it is tried again (`rejoinLater`). */
  async join(signalUrl) {
    this.signalUrl = signalUrl;
    if (this.links.size === 0) this.setStatus("joining");
    try {
      await this.refreshIceServers();
      const link = await this.dial((offer) => this.signalOver(signalUrl, offer), "");
      this.homeId = link.peerId;
      this.rejoinMs = REJOIN_FIRST_MS;
      this.setStatus("linked", { via: link.peerId });
    } catch (error) {
      if (this.links.size === 0) this.setStatus("refused", { code: error.code ?? "error", reason: error.message });
      this.rejoinLater();
      throw error;
    }
  }

  homeLinked() {
    return this.homeId !== null && this.links.get(this.homeId)?.state === "connected";
  }

  rejoinLater() {
    if (this.rejoinTimer !== null || this.leaving || this.homeLinked()) return;
    this.rejoinTimer = setTimeout(() => {
      this.rejoinTimer = null;
      if (this.homeLinked()) return;  // it came back by peer exchange meanwhile
      this.join(this.signalUrl).catch((error) => console.info(`rejoin failed: ${error.message}`));
    }, this.rejoinMs);
    this.rejoinMs = Math.min(this.rejoinMs * 2, REJOIN_MAX_MS);
  }

  signalOver(url, offer) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      const timer = setTimeout(() => { ws.close(); reject(new MeshError("signalling timed out", "timeout")); }, CONNECT_TIMEOUT_MS);
      ws.onopen = () => ws.send(JSON.stringify({ op: "offer", signal: offer }));
      ws.onerror = () => { clearTimeout(timer); reject(new MeshError("cannot reach the node's signalling", "unreachable")); };
      ws.onmessage = (event) => {
        clearTimeout(timer);
        ws.close();
        let reply;
        try {
          reply = JSON.parse(event.data);
        } catch {
          return reject(new MeshError("the node's reply is not JSON", "invalid_signal"));
        }
        if (reply?.op === "answer") resolve(reply.signal);
        else reject(new MeshError(String(reply?.reason ?? "refused").slice(0, 300), String(reply?.code ?? "refused").slice(0, 40)));
      };
    });
  }

  async dial(sendOffer, expected) {
    const link = new Link(this, true);
    if (expected) this.dialing.add(expected);
    try {
      const sdp = await link.localDescription("offer");
      const offer = await buildSignal(this.identity, this.membership, "offer", sdp, expected);
      const answer = await verifySignal(await sendOffer(offer), this.membership, this.identity.id, "answer");
      if (answer.re !== offer.nonce) throw new MeshError("answer does not answer this offer", "invalid_signal");
      if (expected && answer.from !== expected) throw new MeshError("answer came from another member", "invalid_signal");
      link.peerId = answer.from;
      link.name = answer.name.slice(0, 64);
      link.api = answer.api;
      link.offer = { ts: offer.ts, nonce: offer.nonce };
      await link.pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      await link.waitOpen(CONNECT_TIMEOUT_MS);
    } catch (error) {
      link.close(`dial failed: ${error.message}`);
      throw error;
    } finally {
      if (expected) this.dialing.delete(expected);
    }
    return this.register(link);
  }

  /** Make `link` the member's link, unless it is the second of crossed dials (`keepsExistingLink`): then it
   * is retired and the existing link, which is returned, stays. */
  register(link) {
    const old = this.links.get(link.peerId);
    if (old && old !== link && old.state !== "closed") {
      if (keepsExistingLink(old.offer, link.offer)) {
        this.retire(link, old, "duplicate link (crossed dials)");  // not the registered link: no departure
        return old;
      }
      this.retire(old, link, "replaced by a new link");
    }
    this.links.set(link.peerId, link);
    link.start();
    if (link.peerId === this.homeId) this.homeReturned();
    link.notify("advert", this.advert());
    this.gossip();
    this.changed();
    return link;
  }

  /** Close `loser`, a link that lost to `kept` (`keepsExistingLink`), once the member's heartbeat arrives on
   * `kept` (or `kept` closes), at the latest after deadMs (as MeshService._retire): the two ends open a link
   * at different moments, and until that end has started `kept`, `loser` may be the only link open there. */
  retire(loser, kept, reason) {
    this.retiring.add(loser);
    const timer = setTimeout(() => loser.close(reason), this.settings.deadMs);
    kept.peerStarted.then(() => {
      clearTimeout(timer);
      loser.close(reason);
    });
  }

  /** A link to the home node is up again, whoever dialled it: no rejoin is due, the next one starts over. */
  homeReturned() {
    clearTimeout(this.rejoinTimer);
    this.rejoinTimer = null;
    this.rejoinMs = REJOIN_FIRST_MS;
    if (this.status.state !== "linked") this.setStatus("linked", { via: this.homeId });
  }

  closed(link, reason, wasConnected) {
    this.retiring.delete(link);
    if (this.links.get(link.peerId) === link) {
      this.links.delete(link.peerId);
      this.dispatchEvent(new CustomEvent("left", { detail: { id: link.peerId, name: link.name, reason } }));
      if (this.links.size === 0 && this.status.state === "linked") this.setStatus("alone", { reason });
      if (link.peerId === this.homeId) this.rejoinLater();
      this.gossip();
    }
    if (wasConnected) this.changed();
  }

  /** Serve offloads with `compute` (serve.js): its models, speed, switch and battery join the advert, which
   * goes out again when they change. */
  useCompute(compute) {
    this.compute = compute;
    compute.addEventListener("change", () => {
      const fields = JSON.stringify(compute.advertFields());
      if (fields !== this.lastAdvert) {
        this.lastAdvert = fields;
        this.gossip();
      }
    });
  }

  advert() {
    const links = {};
    for (const [id, link] of this.links) if (link.state === "connected") links[id] = link.rttMs === null ? null : Math.round(link.rttMs * 1000) / 1000;
    return {
      kind: "browser", name: this.identity.name, api: "", models: [], shards: [], roots: [], speed: {},
      queue_depth: 0, gateway: false, links, ...(this.compute ? this.compute.advertFields() : {}),
    };
  }

  gossip() {
    const advert = this.advert();
    for (const link of this.links.values()) if (link.state === "connected") link.notify("advert", advert);
  }

  // ----- peer exchange and relayed signalling ------------------------------------------------------------

  onPeers(relay, body) {
    const entries = body.peers;
    if (!Array.isArray(entries) || entries.length > MAX_EXCHANGED) throw new MeshError("peers frame needs a list of at most 64", "protocol");
    for (const entry of entries) {
      if (typeof entry?.id !== "string") throw new MeshError("malformed peers entry", "protocol");
      const id = entry.id;
      if (id === this.identity.id || this.links.has(id) || this.dialing.has(id)) continue;
      if (this.links.size + this.dialing.size >= MAX_LINKS) break;
      if (this.identity.id < id) {  // the smaller id dials, as native members do
        this.dial((offer) => this.relayOffer(relay, id, offer), id).catch((error) => {
          console.info(`peer exchange dial to ${id.slice(0, 12)} failed: ${error.message}`);
        });
      }
    }
  }

  relayOffer(relay, target, offer) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.relayed.delete(offer.nonce); reject(new MeshError("no answer", "timeout")); }, CONNECT_TIMEOUT_MS);
      this.relayed.set(offer.nonce, { resolve, reject, timer });
      relay.notify("signal", { op: "offer", to: target, signal: offer });
    });
  }

  onSignal(relay, body) {
    const { op, to, signal } = body;
    if (!["offer", "answer", "refused"].includes(op) || typeof to !== "string") throw new MeshError("malformed signal frame", "protocol");
    if (to !== this.identity.id) {  // a tab relays nothing: refused at once, so that no dial waits for it
      if (op === "offer") {
        relay.notify("signal", {
          op: "refused", to: String(signal?.from ?? ""), re: signal?.nonce ?? null,
          reason: "a browser member relays no signalling", code: "no_route",
        });
      }
      return;
    }
    if (op === "offer") {
      this.answerRelayed(relay, signal).catch((error) => {
        relay.notify("signal", {
          op: "refused", to: String(signal?.from ?? ""), re: signal?.nonce ?? null,
          reason: String(error.message).slice(0, 300), code: error.code ?? "refused",
        });
      });
      return;
    }
    const nonce = op === "answer" ? signal?.re : body.re;
    const waiter = typeof nonce === "string" ? this.relayed.get(nonce) : undefined;
    if (!waiter) return;
    this.relayed.delete(nonce);
    clearTimeout(waiter.timer);
    if (op === "answer") waiter.resolve(signal);
    else waiter.reject(new MeshError(`refused: ${String(body.reason).slice(0, 200)}`, String(body.code ?? "refused").slice(0, 40)));
  }

  async answerRelayed(relay, raw) {
    const offer = await verifySignal(raw, this.membership, this.identity.id, "offer");
    if (!this.links.has(offer.from) && this.links.size >= MAX_LINKS) throw new MeshError("too many peers", "too_many_peers");
    if (this.dialing.has(offer.from) && this.identity.id < offer.from) throw new MeshError("glare: this member is dialling you", "glare");
    const link = new Link(this, false);
    link.peerId = offer.from;
    link.name = offer.name.slice(0, 64);
    link.api = offer.api;
    link.offer = { ts: offer.ts, nonce: offer.nonce };
    try {
      await link.pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
      const sdp = await link.localDescription("answer");
      const answer = await buildSignal(this.identity, this.membership, "answer", sdp, offer.from, offer.nonce);
      relay.notify("signal", { op: "answer", to: offer.from, signal: answer });
      await link.waitOpen(CONNECT_TIMEOUT_MS);
    } catch (error) {
      link.close(`answer failed: ${error.message}`);
      return;
    }
    this.register(link);
  }

  /** `mesh.key` (mesh/p2p/rekey.py): a member hands over the mesh secret; kept in this tab's memory only. */
  async onMeshKey(link, body) {
    if (typeof body.secret !== "string" || typeof body.rotate !== "boolean") throw new MeshError("malformed mesh.key", "protocol");
    const secret = Uint8Array.from(atob(body.secret), (c) => c.charCodeAt(0));
    if (secret.length < 16 || secret.length > 64) throw new MeshError("mesh.key secret must have 16 to 64 bytes", "protocol");
    const mesh = await meshIdFor(secret);
    if (mesh === this.membership.mesh && this.membership.expires === null) return { mesh, changed: false };
    if (!body.rotate && mesh !== this.membership.mesh) throw new MeshError(`that secret is for mesh ${mesh}`, "wrong_mesh");
    if (body.rotate && body.previous !== this.membership.mesh) throw new MeshError("a rotation from another mesh", "stale_rotation");
    this.membership = { ...this.membership, key: secret, expires: null, mesh };
    await this.refreshIceServers();  // now with TURN credentials
    this.changed();
    return { mesh, changed: true };
  }

  /** Leave: say bye on every link and close it (the tab is closing, or the user left). */
  leave() {
    this.leaving = true;
    clearTimeout(this.rejoinTimer);
    clearInterval(this.gossipTimer);
    for (const link of [...this.links.values()]) link.close("left the mesh", true);
    for (const link of [...this.retiring]) link.close("left the mesh");
    this.setStatus("left");
  }

  members() {
    return [...this.links.values()].map((link) => ({
      id: link.peerId, name: link.name, kind: link.advert.kind === "browser" ? "browser" : "node",
      rtt_ms: link.rttMs, models: Array.isArray(link.advert.models) ? link.advert.models : [],
      links: link.advert.links && typeof link.advert.links === "object" ? Object.keys(link.advert.links) : [],
    }));
  }
}

