// Replies as Markdown, safely: marked turns the text into HTML, DOMPurify keeps only the elements
// Markdown makes. Two locks, either enough alone: raw HTML in a reply is shown as text (marked's
// html renderer escapes it), and the sanitizer drops any tag, attribute or URL outside its lists.
"use strict";

const markdown = (() => {
  const escapeHtml = (s) =>
    s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  const parser = new marked.Marked({
    gfm: true,
    breaks: true, // a chat reply's single newlines are line breaks, as people type them
    renderer: {
      html({ text }) {
        return escapeHtml(text);
      },
    },
  });

  const SANITIZE = {
    ALLOWED_TAGS: [
      "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "code", "pre",
      "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
    ],
    // NOTE: no style attribute: the page's CSP refuses inline style, and a refused one is a
    // console error; `align` is how marked aligns table columns.
    ALLOWED_ATTR: ["href", "title", "start", "align", "class"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
    RETURN_DOM_FRAGMENT: true,
  };

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  // A DocumentFragment of the text rendered; any prefix of a reply renders (an open code fence
  // is a code block up to the end), so a streaming reply can be rendered at every token.
  function render(text) {
    const fragment = DOMPurify.sanitize(parser.parse(text), SANITIZE);
    // marked ends each block with a newline; between blocks it is no text of the reply's.
    for (const node of [...fragment.childNodes]) {
      if (node.nodeType === Node.TEXT_NODE && !node.data.trim()) node.remove();
    }
    return fragment;
  }

  return { render };
})();
