// Upload a checkpoint (a folder's files, or one archive) to POST /api/v1/saes, then follow
// the harvest job it started. Problems are shown in plain words, before sending where we can.
import { upload } from "./api.js";
import { el, showStatus } from "./ui.js";
import { renderJob, watchJob } from "./job.js";

const form = document.getElementById("upload-form");
const folderInput = document.getElementById("upload-folder");
const archiveInput = document.getElementById("upload-archive");
const chosen = document.getElementById("upload-chosen");
const status = document.getElementById("upload-status");
const bar = document.getElementById("upload-progress");
const result = document.getElementById("upload-result");
const known = new Set(form.dataset.known.split(","));
const archiveSuffixes = form.dataset.archives.split(",");
const maxBytes = Number(form.dataset.maxBytes);

function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KB`;
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MB`;
  return `${(bytes / 1024 ** 3).toFixed(2)} GB`;
}

function dirOf(file) {
  const path = file.webkitRelativePath || file.name;
  return path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : "";
}

// The files to send, or a plain-words reason why this choice cannot work.
function selection() {
  const folder = [...folderInput.files];
  const archive = archiveInput.files[0];
  if (folder.length && archive) return { error: "Choose either a folder or an archive, not both." };
  if (archive) {
    if (!archiveSuffixes.some((s) => archive.name.toLowerCase().endsWith(s))) {
      return { error: `“${archive.name}” is not an archive this server reads (${archiveSuffixes.join(", ")}).` };
    }
    return { files: [[archive, archive.name]], total: archive.size, summary: `Archive ${archive.name} (${sizeText(archive.size)}).` };
  }
  if (!folder.length) return { error: "Choose a checkpoint folder or an archive first." };
  const wanted = folder.filter((f) => known.has(f.name));
  if (!wanted.length) {
    return { error: `This folder has none of a checkpoint's files (${[...known].join(", ")}).` };
  }
  const dirs = [...new Set(wanted.map(dirOf))];
  if (dirs.length > 1) {
    return { error: `This folder holds several checkpoints (${dirs.slice(0, 4).join(", ")}); choose one of them.` };
  }
  const total = wanted.reduce((sum, f) => sum + f.size, 0);
  const skipped = folder.length - wanted.length;
  const names = wanted.map((f) => f.name).join(", ");
  return {
    files: wanted.map((f) => [f, f.webkitRelativePath || f.name]),
    total,
    summary: `${wanted.length} file${wanted.length === 1 ? "" : "s"} from ${dirs[0] || "the folder"}: ${names} (${sizeText(total)})${skipped ? `; ${skipped} other file${skipped === 1 ? "" : "s"} left out` : ""}.`,
  };
}

function describeChoice() {
  const chosenFiles = selection();
  chosen.textContent = chosenFiles.error && (folderInput.files.length || archiveInput.files.length) ? chosenFiles.error : chosenFiles.summary || "";
}
folderInput.addEventListener("change", describeChoice);
const harvestBox = form.elements.harvest;
const harvestFields = document.getElementById("harvest-fields");
const toggleHarvest = () => {
  for (const input of harvestFields.querySelectorAll("input, select")) input.disabled = !harvestBox.checked;
};
harvestBox.addEventListener("change", toggleHarvest);
toggleHarvest();
archiveInput.addEventListener("change", describeChoice);

function errorDetails(err) {
  const items = [];
  const detail = err.detail || {};
  if (Array.isArray(detail.errors)) for (const e of detail.errors) items.push(e.message);
  if (detail.file) items.push(`File: ${detail.file}`);
  if (detail.field) items.push(`Field: ${detail.field}`);
  if (detail.existing_slug) items.push(`Already uploaded as ${detail.existing_slug}.`);
  return items;
}

function showResult(sae) {
  const browse = el("a", { class: "button", href: `/saes/${encodeURIComponent(sae.slug)}`, text: `Browse ${sae.slug}` });
  const parts = [el("h2", { text: `Uploaded as ${sae.slug}` })];
  parts.push(el("p", {}, `${sae.architecture}, ${sae.d_sae.toLocaleString("en-US")} latents, reading ${sae.model || "?"} at `, el("code", { text: sae.hook || "?" }), "."));
  if (sae.warnings && sae.warnings.length) {
    parts.push(el("p", { text: "Worth knowing:" }), el("ul", {}, sae.warnings.map((w) => el("li", { text: w }))));
  }
  if (sae.job) {
    const jobBox = el("div", { class: "job", "aria-live": "polite" },
      el("p", {}, "Harvest: ", el("span", { class: "badge", "data-job-status": "" }), " ", el("a", { href: `/jobs/${encodeURIComponent(sae.job.id)}`, text: "job page" })),
      el("progress", { max: "1", value: "0" }),
      el("p", { "data-job-numbers": "" }),
      el("p", { class: "muted", "data-job-message": "" }),
      el("p", { class: "error-text", "data-job-error": "", hidden: true }),
      el("p", { "data-job-done": "", hidden: true }, browse),
    );
    parts.push(jobBox);
    result.replaceChildren(...parts);
    renderJob(jobBox, sae.job);
    watchJob(jobBox, sae.job.id);
  } else {
    parts.push(el("p", {}, browse));
    result.replaceChildren(...parts);
  }
  result.hidden = false;
  result.scrollIntoView({ block: "nearest" });
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const chosenFiles = selection();
  if (chosenFiles.error) {
    showStatus(status, chosenFiles.error, "error");
    return;
  }
  if (chosenFiles.total > maxBytes) {
    showStatus(status, `The checkpoint is ${sizeText(chosenFiles.total)}; this server takes at most ${sizeText(maxBytes)}.`, "error");
    return;
  }
  const data = new FormData();
  for (const [file, name] of chosenFiles.files) data.append("files", file, name);
  for (const name of ["slug", "model_name", "hook_name", "harvest_corpus", "harvest_tokens", "harvest_ctx_len", "harvest_examples"]) {
    const value = form.elements[name].value.trim();
    if (value) data.append(name, value);
  }
  const harvest = form.elements.harvest.checked;
  data.append("harvest", harvest ? "true" : "false");
  if (!harvest) for (const name of ["harvest_corpus", "harvest_tokens", "harvest_ctx_len", "harvest_examples"]) data.delete(name);

  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  result.hidden = true;
  showStatus(status, "Uploading", "loading");
  try {
    const sae = await upload("/api/v1/saes", data, (fraction) => {
      bar.value = fraction;
      if (fraction >= 1) showStatus(status, "Checking the checkpoint", "loading");
    });
    bar.hidden = true;
    showStatus(status, "The checkpoint is valid and stored.", "ok");
    showResult(sae);
  } catch (err) {
    bar.hidden = true;
    showStatus(status, err.message, "error", err);
    const details = errorDetails(err);
    if (details.length) status.append(el("ul", {}, details.map((d) => el("li", { text: d }))));
  } finally {
    submit.disabled = false;
  }
});
