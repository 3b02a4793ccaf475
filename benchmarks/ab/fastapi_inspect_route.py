"""Before InspectRoute: FastAPI solves POST /v1/inspect's dependencies on every request.

The route is registered again with FastAPI's own APIRoute (same endpoint and signature)
before the app includes the router."""

from fastapi.routing import APIRoute

import cellinspect.serving.routers.inspect as routes

routes.router.routes[:] = [r for r in routes.router.routes if type(r) is not routes.InspectRoute]
routes.router.add_api_route(
    "",
    routes.inspect,
    methods=["POST"],
    response_model=routes.InspectResponse,
    route_class_override=APIRoute,
)
