"""The mesh's STUN/TURN servers: the aiortc configuration each new link gets, TURN credentials, and a check of
each TURN server so that a wrong credential or an unreachable relay is reported with its reason (aioice
drops a failed allocation silently: the link then just has no relayed candidate).

Credentials: `[mesh] turn_username`/`turn_password` where set; otherwise, for a node that holds the mesh
secret, TURN REST-style credentials scoped to the mesh (coturn's `use-auth-secret`): the username is
`EXPIRY:MESH_ID`, the password base64(HMAC-SHA1(turn secret, username)), where the turn secret is derived from
the mesh secret (`turn_secret`, what the relay's operator sets as coturn's `static-auth-secret`). They are
made anew for each link and expire after `CREDENTIAL_TTL_S`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aioice.stun
import aioice.turn
from aiortc import RTCConfiguration
from aiortc.rtcicetransport import parse_stun_turn_uri
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.p2p.ice import rtc_configuration
from shoal.mesh.p2p.invite import Invite
from shoal.mesh.p2p.signalling import Membership

logger = logging.getLogger(__name__)
CREDENTIAL_TTL_S = 24 * 3600
CREDENTIAL_WORDS = {"static": "the configured", "mesh": "the mesh's", "invite": "the invite's", "none": "no"}
CHECK_TIMEOUT_S = 5.0
RECHECK_OK_S = 600.0
RECHECK_FAILED_S = (5.0, 300.0)
"""First and largest wait before a failed TURN server is checked again (doubling in between)."""


def turn_secret(mesh_secret: bytes) -> str:
    """The TURN REST shared secret of a mesh (coturn's `static-auth-secret`), derived from its secret."""
    return hmac.new(mesh_secret, b"shoal turn rest secret v1", hashlib.sha256).hexdigest()


def rest_credentials(secret: str, mesh_id: str, ttl_s: float = CREDENTIAL_TTL_S,
                     now: float | None = None, expiry: int | None = None) -> tuple[str, str]:
    """TURN REST-style (username, password) valid for `ttl_s` from `now` (or until `expiry`, unix s), for
    the shared `secret`."""
    if expiry is None:
        expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{mesh_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


@dataclass
class RelayStatus:
    """How the last check of one TURN server went."""

    url: str
    ok: bool | None = None
    """None until checked."""
    code: str | None = None
    """`unauthorized`, `refused`, `unreachable`, `timeout` or `bad_url` when not ok."""
    reason: str | None = None
    relayed: str | None = None
    """The relayed address the server gave (`ip:port`) when ok."""
    credentials: str = "none"
    """`static` (from the config), `mesh` (REST-style, from the mesh secret), `invite` (an expiring invite's)
    or `none`."""
    checked_at: float | None = None


class Relays:
    """The configured STUN/TURN servers of one mesh service, with their credentials and check results."""

    def __init__(self, config: MeshConfig, membership: Callable[[], Membership],
                 invite: Callable[[], Invite | None] = lambda: None) -> None:
        """`invite()`: the invite this node joined with (its servers, and an expiring one's credential)."""
        self.config = config
        self._membership = membership
        self._invite = invite
        self.status: dict[str, RelayStatus] = {}

    def servers(self) -> tuple[str, ...]:
        """Every STUN/TURN server URL this node uses: its config's, then its invite's (what the invites it
        makes carry)."""
        invite = self._invite()
        joined = invite.servers if invite is not None else ()
        return tuple(dict.fromkeys((*self.config.stun, *self.config.turn, *joined)))

    @property
    def stun(self) -> list[str]:
        return [url for url in self.servers() if url.startswith("stun")]

    @property
    def turn(self) -> list[str]:
        return [url for url in self.servers() if url.startswith("turn")]

    def credentials(self) -> tuple[str | None, str | None, str]:
        """(username, password, kind) for the TURN servers now."""
        if self.config.turn_username is not None and self.config.turn_password is not None:
            return self.config.turn_username, self.config.turn_password, "static"
        membership = self._membership()
        if self.turn and membership.has_mesh_secret and membership.secret:
            username, password = rest_credentials(turn_secret(membership.secret), membership.mesh_id)
            return username, password, "mesh"
        invite = self._invite()
        if self.turn and invite is not None and invite.turn_credential and not invite.expired(time.time()):
            return invite.turn_credential[0], invite.turn_credential[1], "invite"
        return self.config.turn_username, self.config.turn_password, "none"

    def usable_turn(self) -> list[str]:
        """The TURN URLs a new link may use, in order: those not known to fail. aiortc uses only the first
        one, so a failing `turn:…` (UDP blocked, say) must not hide a working `…?transport=tcp` after it;
        the periodic checks bring a server back once it answers."""
        failing = {url for url, status in self.status.items() if status.ok is False}
        return [url for url in self.turn if url not in failing]

    def rtc_configuration(self) -> RTCConfiguration:
        """The aiortc configuration for a new link (fresh credentials each time)."""
        username, password, _ = self.credentials()
        return rtc_configuration(self.stun, self.usable_turn(), username, password)

    async def check(self, url: str) -> RelayStatus:
        """Allocate on the TURN server at `url` and release the allocation; record and return the outcome."""
        username, password, kind = self.credentials()
        status = RelayStatus(url, credentials=kind, checked_at=time.time())
        try:
            parsed = parse_stun_turn_uri(url)
        except ValueError as exc:
            status.ok, status.code, status.reason = False, "bad_url", f"{url}: {exc}"
            self.status[url] = status
            return status
        server = (parsed["host"], parsed["port"])
        where = f"TURN server {parsed['host']}:{parsed['port']} ({parsed['transport']})"
        transport = None
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                transport, _ = await aioice.turn.create_turn_endpoint(
                    asyncio.DatagramProtocol, server_addr=server, username=username, password=password,
                    ssl=parsed["scheme"] == "turns", transport=parsed["transport"],
                )
            relayed = transport.get_extra_info("sockname")
            status.ok, status.relayed = True, f"{relayed[0]}:{relayed[1]}"
        except aioice.stun.TransactionFailed as exc:
            code, text = exc.response.attributes.get("ERROR-CODE", (0, ""))
            status.ok = False
            if code in (401, 403, 438) or (code == 0 and username is None):
                status.code = "unauthorized"
                how = CREDENTIAL_WORDS[kind]
                status.reason = f"{where} refused {how} credentials ({code} {text.strip()})"
            else:
                status.code = "refused"
                status.reason = f"{where} refused the allocation ({code} {text.strip()})"
        except TimeoutError:
            status.ok, status.code = False, "timeout"
            status.reason = f"{where} did not answer within {CHECK_TIMEOUT_S:.0f} s"
        except (OSError, ConnectionError, aioice.stun.TransactionError) as exc:
            status.ok, status.code = False, "unreachable"
            status.reason = f"{where} unreachable: {exc or type(exc).__name__}"
        finally:
            if transport is not None:
                transport.close()
        if not status.ok:
            logger.warning("mesh: relay unusable: %s", status.reason)
        elif not (previous := self.status.get(url)) or previous.ok is not True:
            logger.info("mesh: %s gives relayed address %s", where, status.relayed)
        self.status[url] = status
        return status

    async def run(self) -> None:
        """Check every TURN server now and again: every `RECHECK_OK_S` while all are fine, sooner (from 5 s,
        doubling up to 300 s) while one fails."""
        wait_failed = RECHECK_FAILED_S[0]
        while True:
            results = await asyncio.gather(*(self.check(url) for url in self.turn))
            if not results:  # none yet (a runtime join may bring some with its invite)
                await asyncio.sleep(RECHECK_FAILED_S[0])
                continue
            if all(result.ok for result in results):
                wait_failed = RECHECK_FAILED_S[0]
                await asyncio.sleep(RECHECK_OK_S)
            else:
                await asyncio.sleep(wait_failed)
                wait_failed = min(wait_failed * 2, RECHECK_FAILED_S[1])

    def view(self) -> dict[str, Any]:
        """`ice` in `GET /v1/mesh/peers`: the servers this node uses and how its TURN checks went."""
        return {
            "stun": self.stun,
            "turn": [asdict(self.status.get(url) or RelayStatus(url)) for url in self.turn],
        }
