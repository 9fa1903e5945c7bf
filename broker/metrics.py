"""The broker's numbers, in the Prometheus text format (the `metrics` API op; the gateway serves it at /metrics).

Counters and histograms are updated where the broker learns a thing: a job's final state (`job_final`,
from `Broker.finalize`), a stage's time on a job (`stage_busy`, with the timings progress records),
a DiT step (`step`), an API request refused with a structured error (`api_error`), a webhook
attempt's outcome (`webhook`, from broker/webhooks.py's thread). What is a state rather than an event
(queue depth, which stages are up, device memory) is read from the broker when the metrics are
rendered, so it is never stale.

Labels are only model, status, stage, code, device and outcome: never a job id, a key, a prompt or a
webhook URL, so the number of series stays bounded by the config.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.store import Job
from broker.webhooks import OUTCOMES as WEBHOOK_OUTCOMES

if TYPE_CHECKING:
    from broker.broker import Broker

# Seconds; from tiny CPU jobs (about a second) to long 720p jobs on a card (an hour).
LATENCY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
WAIT_BUCKETS = (0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A stage that stops sending step reports for a job (killed mid-job) must not keep its entry for good.
MAX_STEP_MARKS = 10_000


class BrokerMetrics:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("wan_jobs", "Jobs that reached a final state", ["model", "status"], registry=r)
        self.job_errors = Counter("wan_job_errors", "Failed jobs, by error code", ["code"], registry=r)
        self.api_errors = Counter("wan_api_errors", "API requests the broker refused, by error code", ["code"],
                                  registry=r)
        self.queue_depth = Gauge("wan_queue_depth", "Jobs queued or processing", ["status"], registry=r)
        self.queue_wait = Histogram("wan_job_queue_wait_seconds",
                                    "Time from submission to first dispatch, observed when the job ends",
                                    ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.latency = Histogram("wan_job_latency_seconds", "Time from submission to the final state",
                                 ["model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_busy = Counter("wan_stage_busy_seconds", "Seconds a stage spent on jobs (accepted to forwarded)",
                                  ["stage"], registry=r)
        self.step_seconds = Histogram("wan_stage_step_seconds", "Seconds per denoising step (since the stage "
                                      "accepted the job, or since its previous step)", ["stage"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.stage_up = Gauge("wan_stage_up", "1 while the stage sends ready heartbeats, else 0", ["stage"],
                              registry=r)
        self.device_total = Gauge("wan_device_memory_total_bytes", "The stage's device memory (host RAM for cpu)",
                                  ["stage", "device"], registry=r)
        self.device_used = Gauge("wan_device_memory_used_bytes", "Device memory in use (total - free)",
                                 ["stage", "device"], registry=r)
        self.weight_bytes = Gauge("wan_stage_weight_bytes", "Bytes of weights the stage holds on its device",
                                  ["stage", "device"], registry=r)
        self.webhook_deliveries = Counter("wan_webhook_deliveries", "Webhook attempts by outcome: delivered (2xx), "
                                          "failed (to be retried), expired (retry window passed), refused",
                                          ["outcome"], registry=r)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome=outcome)  # every outcome shows, at 0 until it happens
        self._step_marks: dict[tuple[str, str], float] = {}  # (job id, stage) -> when its last step (or accept) was

    # ---- events ----
    def job_final(self, job: Job) -> None:
        self.jobs.labels(model=job.model, status=job.status).inc()
        if job.status == "failed":
            code = job.error.get("code") if isinstance(job.error, dict) else None
            self.job_errors.labels(code=str(code or "JOB_FAILED")[:64]).inc()
        if job.started_at is not None:
            self.queue_wait.labels(model=job.model).observe(max(0.0, job.started_at - job.created_at))
        finished = job.finished_at if job.finished_at is not None else time.time()
        self.latency.labels(model=job.model, status=job.status).observe(max(0.0, finished - job.created_at))
        self.forget(job.id)

    def webhook(self, outcome: str) -> None:
        """One webhook attempt's outcome (called from the delivery thread; prometheus-client locks)."""
        self.webhook_deliveries.labels(outcome=outcome if outcome in WEBHOOK_OUTCOMES else "failed").inc()

    def api_error(self, code: str) -> None:
        self.api_errors.labels(code=code[:64]).inc()

    def busy(self, stage: str, seconds: float) -> None:
        self.stage_busy.labels(stage=stage).inc(max(0.0, seconds))

    def accepted(self, job_id: str, stage: str, at: float) -> None:
        if len(self._step_marks) >= MAX_STEP_MARKS:
            self._step_marks.clear()
        self._step_marks[(job_id, stage)] = at

    def step(self, job_id: str, stage: str, at: float) -> None:
        last = self._step_marks.get((job_id, stage))
        if last is not None and at >= last:
            self.step_seconds.labels(stage=stage).observe(at - last)
        self.accepted(job_id, stage, at)

    def forget(self, job_id: str) -> None:
        for key in [k for k in self._step_marks if k[0] == job_id]:
            del self._step_marks[key]

    # ---- rendering ----
    def refresh(self) -> None:
        """Set the gauges from what the broker knows now."""
        b = self.broker
        for status in ("queued", "processing"):
            self.queue_depth.labels(status=status).set(b.store.count(status))
        for stage in sorted(b.route_stages()):
            self.stage_up.labels(stage=stage).set(1 if b.liveness.alive(stage) else 0)
        for gauge in (self.device_total, self.device_used, self.weight_bytes):
            gauge.clear()  # a stage that moved to another device must not keep its old series
        for stage, beat in b.inflight.heartbeats().items():
            if not beat.device:
                continue
            device = beat.device[:32]
            self.device_total.labels(stage=stage, device=device).set(beat.device_total_bytes)
            self.device_used.labels(stage=stage, device=device).set(
                max(0, beat.device_total_bytes - beat.device_free_bytes))
            self.weight_bytes.labels(stage=stage, device=device).set(beat.weight_bytes)

    def render(self) -> str:
        self.refresh()
        return generate_latest(self.registry).decode()
