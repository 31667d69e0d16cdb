"""The admin API's deployment history: `ListDeployments` and `GetDeployment` (viewer methods).

A mixin of `collector._admin.AdminService`, which sets `history`; kept apart so the servicer's
module stays about commands.
"""

from __future__ import annotations

import grpc

from collector._history import DeploymentHistory
from outrider.v1 import admin_pb2, deployment_pb2

MAX_LIST = 1000  # summaries per answer, whatever the request's limit


class HistoryMethods:
    history: DeploymentHistory | None

    async def ListDeployments(
        self, request: admin_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> admin_pb2.ListDeploymentsResponse:
        if not request.agent:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent: must not be empty")
        if request.limit < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"limit: must be >= 0 (got {request.limit})"
            )
        limit = min(request.limit or MAX_LIST, MAX_LIST)
        return admin_pb2.ListDeploymentsResponse(
            deployments=self.history.list(request.agent, limit) if self.history is not None else []
        )

    async def GetDeployment(
        self, request: admin_pb2.GetDeploymentRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> deployment_pb2.DeploymentRecord:
        if not request.rollout_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rollout_id: must not be empty")
        # a servicer built without a history (tests of the commands alone) knows no record
        record = self.history.get(request.rollout_id) if self.history is not None else None
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no deployment record for rollout {request.rollout_id!r}: unknown id, or the rollout "
                "has not ended (`outrider rollout history AGENT` lists the ended ones)",
            )
            raise AssertionError("unreachable")  # context.abort raises
        return record
