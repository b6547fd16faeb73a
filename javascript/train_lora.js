// Train LoRA tab: what Gradio cannot do. The tab works without this file.
// - Interrupt asks for confirmation first.
// - Ctrl+Enter (Cmd+Enter) starts training on the Train LoRA tab, and generates on the
//   standalone app's txt2img panel, like the webui's own Ctrl+Enter.
// - In the webui, the Lora cards are refreshed when a run or a tool saves its file, so it is listed at once.
// Loaded by the webui from javascript/ (Gradio 3 and 4 alike) and by `python -m lib_lora ui`.
(function () {
    if (window.trainLoraLoaded) {
        return;
    }
    window.trainLoraLoaded = true;

    function root() {
        const app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function visibleButton(id) {
        const element = root().querySelector("#" + id);
        const button = element && (element.tagName === "BUTTON" ? element : element.querySelector("button"));
        return button && button.offsetParent !== null ? button : null;
    }

    document.addEventListener("click", function (event) {
        const target = event.target instanceof Element ? event.target : null;
        if (!target || !target.closest("#train_lora_stop")) {
            return;
        }
        if (!window.confirm("Interrupt training? The LoRA is saved at the next step and the run can be resumed.")) {
            event.stopImmediatePropagation();
            event.preventDefault();
        }
    }, true);

    // A finished run's file is in the Lora folder and works in prompts at once, but the webui's
    // Lora cards are HTML built when the page was made: they list it only after their refresh
    // runs (webui-integration.md fact 10). Click the hidden refresh buttons of both panels when
    // the progress panel shows a new "Saved ..." line, or a tool a new file. Absent in the standalone app: no-op.
    // One panel at a time: each refresh clears and refills the Lora extension's list of files on the
    // server (networks.list_available_networks), so two at once can race and list only part of the files.
    let lastSaved = null;
    function refreshLoraCards(panels) {
        const tab = panels[0];
        const button = tab && root().querySelector("#" + tab + "_lora_extra_refresh_internal");
        if (!button) {
            if (panels.length > 1) {
                refreshLoraCards(panels.slice(1));
            }
            return;
        }
        const before = root().querySelector("#" + tab + "_lora_cards");
        const started = Date.now();
        button.click();
        const timer = setInterval(function () {
            // The webui replaces the cards' HTML when its refresh is done; give up waiting after a minute.
            if (root().querySelector("#" + tab + "_lora_cards") !== before || Date.now() - started > 60000) {
                clearInterval(timer);
                refreshLoraCards(panels.slice(1));
            }
        }, 250);
    }
    function watchSaved() {
        const saved = root().querySelectorAll("#train_lora_progress .train-lora-final, #train_lora_tools .train-lora-final");
        const text = saved.length ? Array.from(saved, function (element) { return element.textContent; }).join("\n") : null;
        if (text && text !== lastSaved) {
            lastSaved = text;
            refreshLoraCards(["txt2img", "img2img"]);
        }
    }
    new MutationObserver(watchSaved).observe(document, {childList: true, subtree: true, characterData: true});

    document.addEventListener("keydown", function (event) {
        if (!(event.key === "Enter" && (event.ctrlKey || event.metaKey))) {
            return;
        }
        const button = visibleButton("train_lora_train") || visibleButton("lora_app_generate");
        if (button) {
            button.click();
            event.preventDefault();
        }
    });
})();
