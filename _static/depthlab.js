// Filters of the claims ledger page: chapter, verdict and kind, applied to every table row.
document.addEventListener("DOMContentLoaded", () => {
  const filters = document.querySelectorAll("[data-ledger-filter]");
  if (!filters.length) return;
  const count = document.querySelector(".depthlab-ledger-count");
  const apply = () => {
    const want = {};
    filters.forEach((f) => { want[f.dataset.ledgerFilter] = f.value; });
    let shown = 0;
    document.querySelectorAll("table.depthlab-ledger tbody tr").forEach((row) => {
      const ok = Object.entries(want).every(([k, v]) => !v || row.dataset[k] === v);
      row.style.display = ok ? "" : "none";
      if (ok) shown += 1;
    });
    if (count) count.textContent = `${shown} claims shown`;
  };
  filters.forEach((f) => f.addEventListener("change", apply));
  apply();
});

// Explorers on the website: every control picks among frames drawn when the page was built.
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".depthlab-explorer").forEach((box) => {
    const names = JSON.parse(box.dataset.names);
    const frames = JSON.parse(box.dataset.frames);
    const img = box.querySelector("img.depthlab-explorer-frame");
    const missing = box.querySelector(".depthlab-explorer-missing");
    const selects = box.querySelectorAll("select[data-control]");
    const show = () => {
      const key = names.map((n) => {
        const sel = box.querySelector(`select[data-control="${n}"]`);
        return `${n}=${sel.value}`;
      }).join("|");
      const src = frames[key];
      img.hidden = !src;
      missing.hidden = Boolean(src);
      if (src) { img.src = src; img.dataset.key = key; }
    };
    selects.forEach((s) => s.addEventListener("change", show));
  });
});
