// Dreambooth tab helpers. Loaded into the WebUI's one shared page: everything is scoped to
// #tab_dreambooth and registered once, in onUiLoaded.
(function () {
    "use strict";

    function root() {
        return gradioApp().getElementById("tab_dreambooth");
    }

    // Cancel stops after the running step and saves; Stop now stops at once without saving.
    function confirming(question, states) {
        return function (event) {
            var state = root().querySelector(".dreambooth-progress");
            var running = state && states.indexOf(state.dataset.state) >= 0;
            if (running && !window.confirm(question)) {
                event.stopImmediatePropagation();
                event.preventDefault();
            }
        };
    }

    var CONFIRMS = {
        dreambooth_cancel: confirming("Cancel training? It stops after the step that is " +
            "running and saves what was trained so far.", ["running", "starting"]),
        dreambooth_stop_now: confirming("Stop now, without saving? What was trained since " +
            "the last save is lost.", ["running", "starting", "cancelling"])
    };

    // After "Use in txt2img" loaded a checkpoint on the server, the WebUI's own checkpoint
    // dropdown at the top still shows the old one: re-read its list (AUTOMATIC1111's and
    // Forge's refresh buttons), then select the title through the WebUI's selectCheckpoint
    // (ui.js), which sets the dropdown's value (the model is already loaded: nothing reloads),
    // then switch to txt2img. In the standalone app none of these exist and nothing happens.
    var REFRESH_IDS = ["refresh_sd_model_checkpoint", "forge_refresh_checkpoint"];

    function showCheckpoint(title) {
        REFRESH_IDS.forEach(function (id) {
            var button = gradioApp().getElementById(id);
            if (button) {
                button.click();
            }
        });
        setTimeout(function () {
            if (typeof selectCheckpoint === "function") {
                selectCheckpoint(title);
            }
            if (typeof switch_to_txt2img === "function") {
                switch_to_txt2img();
            }
        }, 1000);
    }

    function watchMessages(tab) {
        var box = tab.querySelector("#dreambooth_message");
        if (!box || typeof MutationObserver !== "function") {
            return;
        }
        new MutationObserver(function () {
            var used = box.querySelector("[data-checkpoint]:not([data-dreambooth-done])");
            if (used) {
                used.setAttribute("data-dreambooth-done", "1");
                showCheckpoint(used.getAttribute("data-checkpoint"));
            }
        }).observe(box, {childList: true, subtree: true});
    }

    function setup() {
        var tab = root();
        if (!tab || tab.dataset.dreamboothReady) {
            return;
        }
        tab.dataset.dreamboothReady = "1";
        Object.keys(CONFIRMS).forEach(function (id) {
            var button = tab.querySelector("#" + id);
            if (button) {
                button.addEventListener("click", CONFIRMS[id], true);
            }
        });
        watchMessages(tab);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup);
    }
})();
