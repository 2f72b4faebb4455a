// Calls to the JSON API from the pages. The API key never reaches this code: the server
// attaches the one kept in the session cookie; these calls send the page's CSRF token.

export class ApiError extends Error {
  constructor(status, code, message, detail) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail || {};
  }
}

export function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function hasKey() {
  return document.body.dataset.key === "yes";
}

// Plain words for the statuses a person can act on.
function messageFor(status, error) {
  const given = (error && error.message) || "";
  if (status === 401) {
    return hasKey()
      ? "Your API key is no longer valid (it was revoked or is unknown). Enter a new key."
      : given || "This needs an API key. Enter one first.";
  }
  if (status === 403 && error && error.code === "csrf_failed") return given;
  if (status === 503) return given || "The server is busy; try again in a few seconds.";
  if (status === 0) return "The server could not be reached. Check the connection and try again.";
  return given || `The server answered ${status}.`;
}

function toError(status, data) {
  const error = (data && data.error) || {};
  return new ApiError(status, error.code || "error", messageFor(status, error), error.detail);
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json", "X-CSRF-Token": csrfToken() };
  let payload;
  if (body instanceof FormData) {
    payload = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  } catch (err) {
    throw new ApiError(0, "network", messageFor(0, null));
  }
  let data = null;
  if (response.status !== 204) {
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
  }
  if (!response.ok) throw toError(response.status, data);
  return data;
}

// A multipart upload with progress (fetch cannot report upload progress).
export function upload(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(xhr.response);
      else reject(toError(xhr.status, xhr.response));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", messageFor(0, null))));
    xhr.send(formData);
  });
}
