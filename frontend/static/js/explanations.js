// Add or edit an explanation through the JSON API; the page reloads to show the saved text
// and its history (server-rendered).
import { api } from "./api.js";
import { showStatus } from "./ui.js";

const form = document.getElementById("explanation-form");

if (form) {
  const textarea = form.querySelector("textarea");
  const idInput = form.querySelector("input[name=id]");
  const label = document.getElementById("explanation-label");
  const cancel = document.getElementById("explanation-cancel");
  const submit = form.querySelector("button[type=submit]");
  const status = form.querySelector(".form-status");

  const reset = () => {
    idInput.value = "";
    textarea.value = "";
    label.textContent = "Add an explanation";
    submit.textContent = "Save explanation";
    cancel.hidden = true;
  };

  document.querySelectorAll("[data-edit-explanation]").forEach((button) =>
    button.addEventListener("click", () => {
      idInput.value = button.dataset.editExplanation;
      textarea.value = button.dataset.text;
      label.textContent = `Edit explanation ${button.dataset.editExplanation}`;
      submit.textContent = "Save changes";
      cancel.hidden = false;
      textarea.focus();
    }),
  );
  cancel.addEventListener("click", reset);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = textarea.value.trim();
    if (!text) {
      showStatus(status, "Write the explanation first.", "error");
      textarea.focus();
      return;
    }
    const id = idInput.value;
    submit.disabled = true;
    showStatus(status, "Saving", "loading");
    try {
      if (id) await api("PUT", `${form.dataset.url}/${encodeURIComponent(id)}`, { text });
      else await api("POST", form.dataset.url, { text });
      showStatus(status, "Saved.", "ok");
      location.reload();
    } catch (err) {
      showStatus(status, err.message, "error", err);
      submit.disabled = false;
    }
  });
}
