"""What the broker publishes on its PUB socket (endpoint `events`): JobEvents for the gateway
(topic `job`; it forwards them to WebSocket subscribers) and CancelJob for the stages (topic
`cancel`). Every event follows the store write it announces."""

from __future__ import annotations

from typing import Any

import zmq

from broker.store import Job
from common import messages as m


class Events:
    def __init__(self, publish: zmq.Socket[bytes]) -> None:
        self.publish = publish

    def job(self, job: Job, event: str, data: dict[str, Any]) -> None:
        msg = m.JobEvent(job_id=job.id, event=event, data=data, owner=job.owner)
        self.publish.send_multipart([b"job", *m.encode(msg)])

    def cancel(self, job_id: str) -> None:
        self.publish.send_multipart([b"cancel", *m.encode(m.CancelJob(job_id=job_id))])
