// The SAE page's "start a harvest" form: POST /api/v1/saes/{sae}/harvests, then open the job.
import { api } from "./api.js";
import { showStatus } from "./ui.js";

const form = document.getElementById("harvest-form");

if (form) {
  const status = form.querySelector(".form-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { corpus: form.elements.corpus.value.trim() || "builtin" };
    for (const name of ["tokens", "ctx_len", "examples_per_latent"]) {
      const raw = form.elements[name].value.trim();
      const value = Number(raw);
      if (!Number.isInteger(value) || value < 1) {
        showStatus(status, `${form.elements[name].parentElement.firstChild.textContent.trim()} must be a whole number.`, "error");
        form.elements[name].focus();
        return;
      }
      body[name] = value;
    }
    showStatus(status, "Starting", "loading");
    try {
      const started = await api("POST", form.dataset.url, body);
      location.assign(`/jobs/${encodeURIComponent(started.job.id)}`);
    } catch (err) {
      showStatus(status, err.message, "error", err);
    }
  });
}
