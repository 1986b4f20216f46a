"""HTTP routes of the mesh service: the signalling WebSocket and the mesh admin views."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSMsgType, web
from shoal.mesh.p2p.errors import InviteError, MeshError, SignallingError
from shoal.mesh.p2p.invite import Invite, join_url, render_qr

if TYPE_CHECKING:
    from shoal.mesh.p2p.service import MeshService

logger = logging.getLogger(__name__)
MAX_SIGNAL_MESSAGE = 64 * 1024
SIGNAL_WAIT_S = 10.0
MAX_INVITE_LIFETIME_S = 366 * 86400


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(message: str, status: int, code: str) -> web.Response:
    return _json(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}, status
    )


def _from_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def in_a_mesh(service: MeshService) -> bool:
    membership = service.membership
    return bool(membership.secret or membership.allow)


def peers_view(service: MeshService) -> dict[str, Any]:
    return {
        "self": {
            "id": service.identity.peer_id,
            "name": service.identity.name,
            "api": service.advertise_address,
            # None until the node holds a mesh secret, an invite or an allow-list: "not in a mesh".
            "mesh": service.membership.mesh_id if in_a_mesh(service) else None,
            "mesh_name": service.mesh_name if in_a_mesh(service) else None,
        },
        "mesh": service.join_status.view(
            service.membership.mesh_id,
            in_a_mesh(service),
            len(service.connected_peers()),
            service.discovery.dialling(),
        ),
        "peers": [
            {
                **peer.summary(),
                "trusted": peer.peer_id in service.membership.allow,
                "admitted": peer.admitted,
            }
            for peer in service.peers.values()
        ],
        "ice": service.relays.view(),
        "banned": sorted(pid for pid in list(service.bans) if service.is_banned(pid)),
        "refused": service.refused[-20:],
        "departed": service.departed[-20:],
    }


def topology_view(service: MeshService) -> dict[str, Any]:
    me = service.identity.peer_id
    nodes = {me: {"id": me, "name": service.identity.name, "kind": "node"}}
    edges: dict[tuple[str, str], float | None] = {}
    kinds: dict[tuple[str, str], str] = {}
    """What this node's own links are (`path.type`); other members' links are known by RTT only."""
    for peer in service.peers.values():
        nodes[peer.peer_id] = {"id": peer.peer_id, "name": peer.name, "kind": peer.advert.get("kind", "node")}
        summary = peer.summary()
        own = tuple(sorted((me, peer.peer_id)))
        edges[own] = summary["rtt_ms"]  # type: ignore[index]
        if summary.get("path"):
            kinds[own] = summary["path"]["type"]  # type: ignore[index]
        links = peer.advert.get("links")
        if isinstance(links, dict):
            for other, rtt in links.items():
                nodes.setdefault(other, {"id": other, "name": service.known.get(other, {}).get("name")})
                key = tuple(sorted((peer.peer_id, other)))
                edges.setdefault(key, rtt if isinstance(rtt, int | float) else None)  # type: ignore[arg-type]
    return {
        "self": me,
        "nodes": list(nodes.values()),
        "links": [
            {"a": a, "b": b, "rtt_ms": rtt, "type": kinds.get((a, b))} for (a, b), rtt in edges.items()
        ],
        "pipelines": service.pipelines(),
    }


def add_mesh_routes(app: web.Application, service: MeshService) -> None:
    async def signal(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_SIGNAL_MESSAGE, heartbeat=None)
        await ws.prepare(request)
        try:
            async with asyncio.timeout(SIGNAL_WAIT_S):  # wait_for can lose a cancellation (3.11)
                message = await ws.receive()
            if message.type != WSMsgType.TEXT:
                raise SignallingError("expected one text message")
            body = orjson.loads(message.data)
            if not isinstance(body, dict) or body.get("op") != "offer":
                raise SignallingError("expected {'op': 'offer', 'signal': {...}}")
            answer = await service.handle_offer(body.get("signal"))
            await ws.send_str(orjson.dumps({"op": "answer", "signal": answer}).decode())
        except (MeshError, orjson.JSONDecodeError, TimeoutError) as exc:
            logger.info("signalling from %s refused: %s", request.remote, exc)
            code = exc.code if isinstance(exc, SignallingError) else "invalid_signal"
            reply = {"op": "refused", "reason": str(exc)[:300] or type(exc).__name__, "code": code}
            await ws.send_str(orjson.dumps(reply).decode())
        finally:
            await ws.close()
        return ws

    async def peers(request: web.Request) -> web.Response:
        return _json(peers_view(service))

    async def topology(request: web.Request) -> web.Response:
        return _json(topology_view(service))

    async def invite(request: web.Request) -> web.Response:
        if not _from_loopback(request):
            return _error(
                "the invite (it holds the mesh secret) is only shown to local clients", 403, "forbidden"
            )
        lifetime = request.query.get("expires_in")
        expires: int | None = None
        if lifetime is not None:
            if not lifetime.isdigit() or not 1 <= int(lifetime) <= MAX_INVITE_LIFETIME_S:
                message = f"expires_in is a whole number of seconds from 1 to {MAX_INVITE_LIFETIME_S}"
                return _error(message, 400, "invalid_expiry")
            expires = int(time.time()) + int(lifetime)
        try:
            token = service.invite(expires)
        except InviteError as exc:
            return _error(str(exc), 409, "no_mesh_secret")
        if token is None:
            return _error("this node is not in a mesh with a secret", 404, "no_mesh")
        text = token.to_token()
        address = service.advertise_address
        url = join_url(address, text) if address and not address.startswith(("0.0.0.0:", "[::]:")) else None
        body = {
            "invite": text,
            "url": url,  # the join page with the invite in its fragment: what phones scan
            "mesh": service.membership.mesh_id,
            "name": token.name,
            "expires": token.expires,
        }
        if request.query.get("qr") in ("1", "true"):
            body["qr"] = render_qr(url or text)
        return _json(body)

    async def join(request: web.Request) -> web.Response:
        if not _from_loopback(request):
            return _error("joining a mesh is only allowed from local clients", 403, "forbidden")
        try:
            body = orjson.loads(await request.read())
            parsed = Invite.from_token(body["invite"]) if isinstance(body, dict) else None
        except (orjson.JSONDecodeError, KeyError, InviteError) as exc:
            return _error(f'expected {{"invite": "shoal1-..."}}: {exc}', 400, "invalid_invite")
        if parsed is None:
            return _error("expected a JSON object", 400, "invalid_invite")
        if parsed.expired(time.time()):
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(parsed.expires or 0))
            return _error(f"this invite expired at {when}; ask a member for a new one", 400, "invite_expired")
        await service.join(parsed)
        return _json({"mesh": service.membership.mesh_id, "name": service.mesh_name,
                      "bootstrap": list(parsed.bootstrap)})

    async def leave(request: web.Request) -> web.Response:
        if not _from_loopback(request):
            return _error("leaving the mesh is only allowed from local clients", 403, "forbidden")
        return _json(await service.leave())

    app.router.add_get("/v1/mesh/signal", signal)
    app.router.add_get("/v1/mesh/peers", peers)
    app.router.add_get("/v1/mesh/topology", topology)
    app.router.add_get("/v1/mesh/invite", invite)

    async def rotate(request: web.Request) -> web.Response:
        if not _from_loopback(request):
            return _error("rotating the mesh secret is only allowed from local clients", 403, "forbidden")
        try:
            result = await service.rotate()
        except InviteError as exc:
            return _error(str(exc), 409, "no_mesh_secret")
        token = service.invite()
        return _json({**result, "invite": token.to_token() if token is not None else None})

    app.router.add_post("/v1/mesh/join", join)
    app.router.add_post("/v1/mesh/leave", leave)
    app.router.add_post("/v1/mesh/rotate", rotate)
