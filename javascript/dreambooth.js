// Dreambooth tab helpers. Loaded into the WebUI's one shared page: everything is scoped to
// #tab_dreambooth and registered once, in onUiLoaded.
(function () {
    "use strict";

    function root() {
        return gradioApp().getElementById("tab_dreambooth");
    }

    function confirmCancel(event) {
        var state = root().querySelector(".dreambooth-progress");
        var running = state && ["running", "starting"].indexOf(state.dataset.state) >= 0;
        if (running && !window.confirm("Cancel training? What was trained so far is saved.")) {
            event.stopImmediatePropagation();
            event.preventDefault();
        }
    }

    function switchToTxt2img() {
        // The WebUI's own helper (ui.js); absent in the standalone app, where nothing happens.
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        }
    }

    function setup() {
        var tab = root();
        if (!tab || tab.dataset.dreamboothReady) {
            return;
        }
        tab.dataset.dreamboothReady = "1";
        var cancel = tab.querySelector("#dreambooth_cancel");
        if (cancel) {
            cancel.addEventListener("click", confirmCancel, true);
        }
        var use = tab.querySelector("#dreambooth_use_txt2img");
        if (use) {
            use.addEventListener("click", function () {
                setTimeout(switchToTxt2img, 1500);
            });
        }
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup);
    }
})();
