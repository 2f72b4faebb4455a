// Job progress, live: polls GET /api/v1/jobs/{job} until the job is finished.
import { api } from "./api.js";
import { fmtDuration, fmtNum } from "./ui.js";

const FINISHED = new Set(["complete", "failed", "cancelled"]);
const LABELS = { complete: "harvested", running: "harvesting…", queued: "queued", pending: "queued" };

// Fill the job's status elements inside `root` (the job page, or the upload page's result).
export function renderJob(root, job) {
  const q = (sel) => root.querySelector(sel);
  const badge = q("[data-job-status]") || q("#job-status .badge");
  if (badge) {
    badge.textContent = job.kind === "harvest" ? LABELS[job.status] || job.status : job.status;
    badge.className = `badge status-${job.status}`;
  }
  const progress = q("progress");
  const fraction = job.progress.fraction;
  if (progress) {
    if (fraction === null || fraction === undefined) progress.removeAttribute("value");
    else progress.value = fraction;
    progress.textContent = fraction === null || fraction === undefined ? "" : `${(fraction * 100).toFixed(1)}%`;
  }
  const numbers = q("[data-job-numbers]") || q("#job-numbers");
  if (numbers) {
    const parts = [`${fmtNum(job.progress.done)}${job.progress.total ? " of " + fmtNum(job.progress.total) : ""} tokens`];
    if (fraction !== null && fraction !== undefined) parts[0] += ` (${(fraction * 100).toFixed(1)}%)`;
    if (job.rate) parts.push(`${fmtNum(job.rate)} per second`);
    if (job.eta_seconds && !FINISHED.has(job.status)) parts.push(`about ${fmtDuration(job.eta_seconds)} left`);
    numbers.textContent = parts.join(" · ");
  }
  const message = q("[data-job-message]") || q("#job-message");
  if (message) message.textContent = job.message || "";
  const error = q("[data-job-error]") || q("#job-error");
  if (error) {
    error.textContent = job.error ? `The job failed: ${job.error}` : "";
    error.hidden = !job.error;
  }
  const done = q("[data-job-done]") || q("#job-done");
  if (done) done.hidden = !(job.status === "complete" && job.sae);
}

// Poll until finished; resolves with the final job. Network hiccups are retried.
export async function watchJob(root, jobId, intervalMs = 1000) {
  let failures = 0;
  for (;;) {
    try {
      const job = await api("GET", `/api/v1/jobs/${encodeURIComponent(jobId)}`);
      failures = 0;
      renderJob(root, job);
      if (FINISHED.has(job.status)) return job;
    } catch (err) {
      failures += 1;
      const message = root.querySelector("[data-job-message]") || root.querySelector("#job-message");
      if (message) message.textContent = `Could not read the job's progress (${err.message}); retrying.`;
      if (err.status === 404 || failures > 30) return null;
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

const page = document.getElementById("job");
if (page && !FINISHED.has(page.dataset.status)) watchJob(page, page.dataset.job);
