"""The deprecated v1/v2 template build flow, answered 410 Gone with what to use instead.

Old e2b CLIs (``e2b template build``, before the SDK's ``Template.build``) asked for a build here
(``POST /templates``, ``POST /templates/{id}``, ``POST /v2/templates``), built the Dockerfile with
the local ``docker``, pushed the image to E2B's registry (``docker.<domain>/e2b/custom-envs/<id>:<build>``,
logged in with the access token) and then started the build (``POST /templates/{id}/builds/{buildID}``).
Cube runs no registry that takes pushes, and accepts no access token in place of an API key, so
none of this can succeed here; neither the e2b 2.63.0 SDK nor the e2b CLI 2.19.0 calls these routes
(its ``e2b template create`` builds through the SDK's v3 flow, which Cube serves). 410 (not 5xx:
nothing failed, and not 404: the route exists upstream) with a message naming the replacement.
"""

from __future__ import annotations

from fastapi import APIRouter, Security

from cube_api_e2b.errors import GoneError
from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, errors

router = APIRouter(route_class=E2bRoute, tags=["templates"], dependencies=[Security(API_KEY_SCHEME)])
"""Mounted after the tag routes: ``POST /templates/tags`` is not ``POST /templates/{templateID}``."""

GONE = ("the {what} of the Docker registry build flow is not served by Cube: it runs no registry to push to. "
        "Build with the SDK's Template.build (e2b >= 2) or `e2b template create` (@e2b/cli >= 2)")
RESPONSES = errors(410)


def _gone(what: str) -> GoneError:
    return GoneError(reason=GONE.format(what=what))


@router.post("/templates", status_code=202, responses=RESPONSES, deprecated=True,
             summary="Deprecated build request (v1, Docker registry flow): 410")
async def request_v1(team: CurrentTeam) -> None:
    raise _gone("build request (POST /templates)")


@router.post("/v2/templates", status_code=202, responses=RESPONSES, deprecated=True,
             summary="Deprecated build request (v2, Docker registry flow): 410")
async def request_v2(team: CurrentTeam) -> None:
    raise _gone("build request (POST /v2/templates)")


@router.post("/templates/{template_id}", status_code=202, responses=RESPONSES, deprecated=True,
             summary="Deprecated rebuild request (v1, Docker registry flow): 410")
async def rebuild_v1(template_id: str, team: CurrentTeam) -> None:
    raise _gone("rebuild request (POST /templates/{templateID})")


@router.post("/templates/{template_id}/builds/{build_id}", status_code=202, responses=RESPONSES, deprecated=True,
             summary="Deprecated build start (v1, Docker registry flow): 410")
async def start_v1(template_id: str, build_id: str, team: CurrentTeam) -> None:
    raise _gone("build start (POST /templates/{templateID}/builds/{buildID})")
