"""modules.shared_state.State (what shared.state is), recording begin/end for the tests."""
import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = '0'
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None

    def __init__(self):
        self.history = []  # stand-in only: ("begin", job) / ("end", job)

    def interrupt(self):
        self.interrupted = True

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.interrupted = False
        self.textinfo = None
        self.job = job
        self.history.append(("begin", job))

    def end(self):
        self.history.append(("end", self.job))
        self.job = ""
        self.job_count = 0
