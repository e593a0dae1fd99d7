// The login page: say so when the last token was refused.

if (new URLSearchParams(window.location.search).has("failed")) {
  document.getElementById("login-failed").hidden = false;
}
