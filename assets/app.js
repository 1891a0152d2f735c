// Mipha Chat's page behaviour that lives in the browser: the address bar, back/forward,
// clicks inside messages, the length counter, focus, the phone drawer, clean copies and the
// light/dark toggle. It talks to the server only through two hidden fields the page defines:
// #conversation-address (the server writes "c:" and the open conversation's id), #page-action (this
// script writes a small JSON action for a click inside a message) and #page-navigation (the
// conversation id after back/forward). Their change events reach the server, which checks the
// values like any other input.
(() => {
  "use strict";

  const NARROW = "(max-width: 768px)";
  const THEME_KEY = "mipha-theme";
  let actionCount = 0;
  let followingHistory = false;

  const field = (id) => document.querySelector(`#${id} textarea`) || document.querySelector(`#${id} input`);
  const isNarrow = () => window.matchMedia(NARROW).matches;

  // --- hidden fields ----------------------------------------------------------------------

  function sendAction(action) {
    const input = field("page-action");
    if (!input) return;
    actionCount += 1;
    input.value = JSON.stringify({ ...action, n: actionCount });
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  // --- the address follows the open conversation; back/forward move between them ---------

  function addressFor(id) {
    const url = new URL(window.location.href);
    if (id) url.searchParams.set("c", id);
    else url.searchParams.delete("c");
    return url;
  }

  function syncAddress() {
    const input = field("conversation-address");
    if (!input || !input.value.startsWith("c:")) return; // the server has not loaded the page yet
    const id = input.value.slice(2).trim();
    const current = new URL(window.location.href).searchParams.get("c") || "";
    if (id === current) {
      followingHistory = false;
      return;
    }
    if (followingHistory) return; // the server has not answered the back/forward yet
    window.history.pushState({ conversation: id }, "", addressFor(id));
  }

  window.addEventListener("popstate", () => {
    const input = field("page-navigation");
    if (!input) return;
    followingHistory = true;
    actionCount += 1;
    // the count makes going back to the same conversation twice still a change
    input.value = `${new URL(window.location.href).searchParams.get("c") || ""}#${actionCount}`;
    input.dispatchEvent(new Event("input", { bubbles: true }));
  });

  // --- clicks inside messages: edit a question, switch between versions -----------------

  function messageAction(button) {
    let action = null;
    let message = null;
    for (const name of button.classList) {
      if (name.startsWith("action-")) action = name.slice("action-".length);
      if (name.startsWith("message-") && /^message-\d+$/.test(name)) message = Number.parseInt(name.slice(8), 10);
    }
    return action && Number.isSafeInteger(message) ? { action, message } : null;
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("#chatbot button.message-action");
    if (button) {
      event.preventDefault();
      event.stopPropagation();
      const action = messageAction(button);
      if (action) sendAction(action);
      if (action && action.action === "edit") focusComposer();
      return;
    }
    const copyLink = event.target.closest("button.copy-share-link");
    if (copyLink) {
      const link = copyLink.parentElement.querySelector("a");
      if (link) navigator.clipboard?.writeText(new URL(link.getAttribute("href"), window.location.href).href);
      copyLink.textContent = "Copied";
      return;
    }
    if (event.target.closest("#send-button")) setTimeout(focusComposer, 50);
    if (event.target.closest("#conversation-list label, #new-chat-button") && isNarrow()) closeDrawer();
  }, true);

  // --- the composer: focus, length counter -------------------------------------------------

  function focusComposer() {
    const input = field("chat-input");
    if (input && !input.disabled) input.focus();
  }

  function codePoints(text) {
    let count = 0;
    for (const _ of text) count += 1;
    return count;
  }

  function updateCounter() {
    const counter = document.getElementById("char-counter");
    const input = field("chat-input");
    const send = document.getElementById("send-button");
    if (!counter || !input) return;
    const limitClass = [...counter.classList].find((name) => /^max-\d+$/.test(name));
    const limit = limitClass ? Number.parseInt(limitClass.slice(4), 10) : 0;
    const length = codePoints(input.value);
    const over = limit > 0 && length > limit;
    counter.classList.toggle("over", over);
    if (over) {
      counter.textContent = `${length.toLocaleString()} / ${limit.toLocaleString()} characters: ` +
        `${(length - limit).toLocaleString()} too many. Shorten the message to send it.`;
    } else if (limit > 0 && length >= limit * 0.8) {
      counter.textContent = `${length.toLocaleString()} / ${limit.toLocaleString()} characters`;
    } else {
      counter.textContent = "";
    }
    if (send) {
      if (over && !send.disabled) {
        send.disabled = true;
        send.dataset.tooLong = "1";
      } else if (!over && send.dataset.tooLong) {
        delete send.dataset.tooLong;
        send.disabled = false;
      }
      if (over) send.setAttribute("aria-describedby", "char-counter");
      else send.removeAttribute("aria-describedby");
    }
  }

  document.addEventListener("input", (event) => {
    if (event.target.closest && event.target.closest("#chat-input")) updateCounter();
  }, true);

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && event.target.closest && event.target.closest("#chat-input")) {
      setTimeout(focusComposer, 50);
    }
  }, true);

  // --- phone: the sidebar is a drawer that closes once a conversation is chosen -----------

  function closeDrawer(delay = 150) {
    // a click on a list entry reaches both the label and its radio button: close once, when still open
    setTimeout(() => {
      const sidebar = document.querySelector(".sidebar.open");
      const toggle = sidebar && sidebar.querySelector(".toggle-button");
      if (toggle) toggle.click();
    }, delay);
  }

  // --- copy gives clean text: no markup, no version switcher, no speed footer -------------

  function cleanText(html) {
    const doc = new DOMParser().parseFromString(html, "text/html"); // inert: loads and runs nothing
    doc.querySelectorAll(".message-controls, .reply-footer, .branch-switch").forEach((el) => el.remove());
    doc.querySelectorAll("li").forEach((li) => li.prepend(doc.createTextNode("- ")));
    doc.querySelectorAll("br").forEach((br) => br.replaceWith(doc.createTextNode("\n")));
    doc.querySelectorAll("p, li, pre, h1, h2, h3, h4, h5, h6, blockquote, tr").forEach((el) => {
      el.append(doc.createTextNode("\n"));
    });
    return doc.body.textContent.replace(/\n{3,}/g, "\n\n").trim();
  }

  if (navigator.clipboard && navigator.clipboard.writeText) {
    const writeText = navigator.clipboard.writeText.bind(navigator.clipboard);
    navigator.clipboard.writeText = (text) => {
      const looksRendered = typeof text === "string" && /<\/?(p|pre|ul|ol|div|span|code|em|strong|a)\b/.test(text);
      return writeText(looksRendered ? cleanText(text) : text);
    };
  }

  // --- light/dark: follows the system until the person picks one -------------------------

  function applyTheme(theme) {
    const dark = theme === "dark" || (theme !== "light" && window.matchMedia("(prefers-color-scheme: dark)").matches);
    document.body.classList.toggle("dark", dark);
    const toggle = document.getElementById("theme-toggle");
    if (toggle) {
      toggle.setAttribute("aria-pressed", String(dark));
      toggle.textContent = dark ? "Light mode" : "Dark mode";
    }
  }

  function storedTheme() {
    try {
      return window.localStorage.getItem(THEME_KEY);
    } catch {
      return null;
    }
  }

  document.addEventListener("click", (event) => {
    if (!event.target.closest("#theme-toggle")) return;
    const dark = !document.body.classList.contains("dark");
    try {
      window.localStorage.setItem(THEME_KEY, dark ? "dark" : "light");
    } catch {
      // private windows may refuse storage: the choice then lasts for this page only
    }
    applyTheme(dark ? "dark" : "light");
  });

  // --- start ------------------------------------------------------------------------------

  function textOf(html) {
    return new DOMParser().parseFromString(html, "text/html").body.textContent.replace(/\s+/g, " ").trim();
  }

  function tidyForScreenReaders() {
    // Gradio names each message by its raw content, which is HTML here: name it by its text
    document.querySelectorAll("#chatbot [aria-label*='<']").forEach((el) => {
      const label = el.getAttribute("aria-label");
      const colon = label.indexOf(": ");
      el.setAttribute("aria-label", colon > 0 ? label.slice(0, colon + 2) + textOf(label.slice(colon + 2)) : textOf(label));
    });
    // the starting suggestions are buttons, not list items
    document.querySelectorAll("#chatbot .examples[role='list']").forEach((el) => el.removeAttribute("role"));
  }

  // a notice stays until the person changes the text; then it fades. The class goes on the notice
  // itself, so the next notice (a new element) shows at once.
  document.addEventListener("input", (event) => {
    if (event.target.closest && event.target.closest("#chat-input")) {
      document.querySelectorAll("#composer-notice .notice.error, #composer-notice .notice.warning")
        .forEach((shown) => shown.classList.add("dismissed"));
    }
  }, true);

  function announceChanges() {
    // the page's sanitizer drops aria-live from rendered text: set it on the containers instead
    for (const id of ["composer-notice", "char-counter-box", "context-meter"]) {
      const box = document.getElementById(id);
      if (box && !box.hasAttribute("aria-live")) box.setAttribute("aria-live", "polite");
    }
  }

  let themed = false;
  let drawerChecked = false;
  setInterval(() => {
    syncAddress();
    announceChanges();
    tidyForScreenReaders();
    const toggle = document.getElementById("theme-toggle");
    if (toggle && !themed) {
      themed = true;
      applyTheme(storedTheme());
    }
    if (!drawerChecked && document.querySelector(".sidebar")) {
      drawerChecked = true;
      if (isNarrow()) closeDrawer(0);
      // the stylesheet keeps the drawer out of sight until it is closed: no flash at load on a phone
      setTimeout(() => document.body.classList.add("drawer-ready"), isNarrow() ? 400 : 0);
    }
  }, 250);
})();
