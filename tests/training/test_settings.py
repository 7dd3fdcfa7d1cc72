"""The training settings as a client sees them: lr_schedule and max_grad_norm
(hyperparameters: listed in full, validated, PATCHable, in checkpoints) and
the session fields workers, min_workers, round_timeout. Bad values are 422
(bad_hyperparam for hyperparameters, invalid for session fields); wrong JSON
types are 400 bad_request; a failed request changes nothing."""

import unittest

from harness import DaemonTest, uniq

OPTIMIZERS = ["sgd", "momentum", "nag", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "adamw", "nadam"]

BAD_SCHEDULES = [  # (label, lr_schedule) -> 422 bad_hyperparam
    ("step gamma 0", {"type": "step", "step_size": 10, "gamma": 0}),
    ("step gamma < 0", {"type": "step", "step_size": 10, "gamma": -0.5}),
    ("multistep gamma 0", {"type": "multistep", "milestones": [10], "gamma": 0}),
    ("exponential gamma 0", {"type": "exponential", "gamma": 0}),
    ("exponential gamma < 0", {"type": "exponential", "gamma": -1}),
    ("exponential without gamma", {"type": "exponential"}),
    ("unknown type", {"type": "plateau"}),
    ("no type", {"step_size": 10}),
    ("missing step_size", {"type": "step", "gamma": 0.5}),
    ("step_size 0", {"type": "step", "step_size": 0}),
    ("step_size not whole", {"type": "step", "step_size": 2.5}),
    ("milestones repeated", {"type": "multistep", "milestones": [10, 10], "gamma": 0.5}),
    ("milestones decreasing", {"type": "multistep", "milestones": [20, 10], "gamma": 0.5}),
    ("milestone negative", {"type": "multistep", "milestones": [-1, 10]}),
    ("missing milestones", {"type": "multistep", "gamma": 0.5}),
    ("cosine without T_max", {"type": "cosine"}),
    ("cosine T_max 0", {"type": "cosine", "T_max": 0}),
    ("linear start_factor 0", {"type": "linear", "start_factor": 0}),
    ("linear start_factor > 1", {"type": "linear", "start_factor": 1.5}),
    ("linear end_factor > 1", {"type": "linear", "end_factor": 1.5}),
    ("linear end_factor < 0", {"type": "linear", "end_factor": -0.1}),
    ("linear total_iters 0", {"type": "linear", "total_iters": 0}),
    ("warmup_steps -1", {"type": "exponential", "gamma": 0.9, "warmup_steps": -1}),
    ("warmup_steps not whole", {"type": "exponential", "gamma": 0.9, "warmup_steps": 1.5}),
]

# A field an lr_schedule of that type does not take: 422 unknown_field
# (API.md Conventions: strict request bodies).
UNKNOWN_SCHEDULE_FIELDS = [
    ("field of another type", {"type": "exponential", "gamma": 0.9, "T_max": 10}),
    ("misspelt field", {"type": "step", "step_size": 10, "gama": 0.5}),
]

WRONG_TYPES = [  # (label, hyperparams) -> 400 bad_request
    ("lr_schedule string", {"lr_schedule": "cosine"}),
    ("lr_schedule array", {"lr_schedule": []}),
    ("lr_schedule number", {"lr_schedule": 1}),
    ("type number", {"lr_schedule": {"type": 5}}),
    ("step_size string", {"lr_schedule": {"type": "step", "step_size": "10"}}),
    ("gamma string", {"lr_schedule": {"type": "exponential", "gamma": "0.5"}}),
    ("milestones string", {"lr_schedule": {"type": "multistep", "milestones": "5"}}),
    ("warmup_steps string", {"lr_schedule": {"type": "cosine", "T_max": 5, "warmup_steps": "5"}}),
    ("max_grad_norm string", {"max_grad_norm": "1"}),
    ("max_grad_norm bool", {"max_grad_norm": True}),
    ("max_grad_norm array", {"max_grad_norm": [1]}),
]

BAD_FIELDS = [  # (label, top-level fields, status, code)
    ("workers 0", {"workers": 0}, 422, "invalid"),
    ("workers -1", {"workers": -1}, 422, "invalid"),
    ("workers 1.5", {"workers": 1.5}, 422, "invalid"),
    ("min_workers 0", {"workers": 2, "min_workers": 0}, 422, "invalid"),
    ("min_workers > workers", {"workers": 2, "min_workers": 3}, 422, "invalid"),
    ("min_workers > default workers", {"min_workers": 2}, 422, "invalid"),
    ("round_timeout 0", {"round_timeout": 0}, 422, "invalid"),
    ("round_timeout < 0", {"round_timeout": -5}, 422, "invalid"),
    ("workers string", {"workers": "2"}, 400, "bad_request"),
    ("min_workers null", {"workers": 2, "min_workers": None}, 400, "bad_request"),
    ("round_timeout string", {"round_timeout": "1"}, 400, "bad_request"),
]


class SettingsTests(DaemonTest):
    def new(self, **extra):
        name = uniq("set")
        body = {"name": name, "optimizer": "sgd", "params": [1.0, 2.0]}
        body.update(extra)
        return name, self.create(body)

    def test_defaults_listed_in_full(self):
        _, s = self.new()
        self.assertIn("lr_schedule", s["hyperparams"])
        self.assertIsNone(s["hyperparams"]["lr_schedule"])
        self.assertIn("max_grad_norm", s["hyperparams"])
        self.assertIsNone(s["hyperparams"]["max_grad_norm"])
        self.assertEqual(s["workers"], 1)
        self.assertEqual(s["min_workers"], 1)
        self.assertEqual(s["round_timeout"], 60)
        for opt in OPTIMIZERS:
            name = uniq(opt)
            s = self.create({"name": name, "optimizer": opt, "size": 2,
                             "hyperparams": {"max_grad_norm": 2.5,
                                             "lr_schedule": {"type": "cosine", "T_max": 10}}})
            self.assertEqual(s["hyperparams"]["max_grad_norm"], 2.5, opt)
            self.assertEqual(s["hyperparams"]["lr_schedule"],
                             {"type": "cosine", "T_max": 10, "eta_min": 0, "warmup_steps": 0}, opt)
            got = self.api.get("/v1/sessions/%s" % name).json
            self.assertEqual(got["hyperparams"], s["hyperparams"], opt)

    def test_schedule_defaults_filled_in(self):
        cases = [
            ({"type": "step", "step_size": 3}, {"type": "step", "step_size": 3, "gamma": 0.1, "warmup_steps": 0}),
            ({"type": "multistep", "milestones": [2, 5]},
             {"type": "multistep", "milestones": [2, 5], "gamma": 0.1, "warmup_steps": 0}),
            ({"type": "linear"}, {"type": "linear", "start_factor": 1 / 3, "end_factor": 1.0, "total_iters": 5,
                                  "warmup_steps": 0}),
            ({"type": "exponential", "gamma": 0.5, "warmup_steps": 7},
             {"type": "exponential", "gamma": 0.5, "warmup_steps": 7}),
        ]
        for given, want in cases:
            _, s = self.new(hyperparams={"lr_schedule": given})
            self.assertEqual(s["hyperparams"]["lr_schedule"], want, given)

    def test_bad_schedules(self):
        for label, sched in BAD_SCHEDULES:
            with self.subTest(label):
                r = self.api.post("/v1/sessions", {"name": uniq("bad"), "optimizer": "sgd", "size": 2,
                                                   "hyperparams": {"lr_schedule": sched}})
                self.assertError(r, 422, "bad_hyperparam")
        for label, sched in UNKNOWN_SCHEDULE_FIELDS:
            with self.subTest(label):
                r = self.api.post("/v1/sessions", {"name": uniq("bad"), "optimizer": "sgd", "size": 2,
                                                   "hyperparams": {"lr_schedule": sched}})
                self.assertError(r, 422, "unknown_field")

    def test_bad_max_grad_norm(self):
        for v in (0, -1, 0.0):
            with self.subTest(v):
                r = self.api.post("/v1/sessions", {"name": uniq("bad"), "optimizer": "adam", "size": 2,
                                                   "hyperparams": {"max_grad_norm": v}})
                self.assertError(r, 422, "bad_hyperparam")

    def test_wrong_types(self):
        for label, hp in WRONG_TYPES:
            with self.subTest(label):
                r = self.api.post("/v1/sessions", {"name": uniq("bad"), "optimizer": "sgd", "size": 2,
                                                   "hyperparams": hp})
                self.assertError(r, 400, "bad_request")

    def test_bad_session_fields(self):
        for label, fields, status, code in BAD_FIELDS:
            with self.subTest(label):
                body = dict({"name": uniq("bad"), "optimizer": "sgd", "size": 2}, **fields)
                self.assertError(self.api.post("/v1/sessions", body), status, code)

    def test_patch_validates_and_changes_nothing_on_failure(self):
        name, s0 = self.new(workers=2, hyperparams={"lr": 0.5, "max_grad_norm": 1.0,
                                                    "lr_schedule": {"type": "exponential", "gamma": 0.9}})
        path = "/v1/sessions/%s" % name
        for label, sched in BAD_SCHEDULES:
            with self.subTest(label):
                # a valid lr beside the bad schedule must not be applied either
                self.assertError(self.api.patch(path, {"hyperparams": {"lr": 0.01, "lr_schedule": sched}}),
                                 422, "bad_hyperparam")
        for label, sched in UNKNOWN_SCHEDULE_FIELDS:
            with self.subTest(label):
                self.assertError(self.api.patch(path, {"hyperparams": {"lr": 0.01, "lr_schedule": sched}}),
                                 422, "unknown_field")
        for label, hp in WRONG_TYPES:
            with self.subTest(label):
                self.assertError(self.api.patch(path, {"hyperparams": hp}), 400, "bad_request")
        for label, fields, status, code in BAD_FIELDS:
            if label == "min_workers > default workers":
                continue  # this session has 2 workers
            with self.subTest(label):
                self.assertError(self.api.patch(path, dict(fields, hyperparams={"lr": 0.01})), status, code)
        self.assertError(self.api.patch(path, {"hyperparams": {"max_grad_norm": 0}}), 422, "bad_hyperparam")
        # min_workers above the current workers, given alone
        self.assertError(self.api.patch(path, {"min_workers": 3}), 422, "invalid")
        s1 = self.api.get(path).json
        for k in ("hyperparams", "workers", "min_workers", "round_timeout", "step"):
            self.assertEqual(s1[k], s0[k], k)

    def test_patch_sets_and_clears(self):
        name, _ = self.new(dtype="float64")
        path = "/v1/sessions/%s" % name
        r = self.api.patch(path, {"hyperparams": {"lr_schedule": {"type": "step", "step_size": 1, "gamma": 0.5},
                                                  "max_grad_norm": 1.0},
                                  "workers": 4, "min_workers": 2, "round_timeout": 0.5})
        self.assertEqual(r.status, 200, r)
        s = r.json
        self.assertEqual(s["hyperparams"]["lr_schedule"]["type"], "step")
        self.assertEqual(s["hyperparams"]["max_grad_norm"], 1.0)
        self.assertEqual((s["workers"], s["min_workers"], s["round_timeout"]), (4, 2, 0.5))
        self.assertEqual(self.api.get(path).json, s)
        r = self.api.patch(path, {"hyperparams": {"lr_schedule": None, "max_grad_norm": None}, "workers": 1,
                                  "min_workers": 1})
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.json["hyperparams"]["lr_schedule"])
        self.assertIsNone(r.json["hyperparams"]["max_grad_norm"])
        # cleared: the step uses the plain lr and does not clip
        st = self.step(name, [30.0, 40.0])
        self.assertEqual(st.status, 200, st)
        self.assertEqual(st.json["lr"], 0.01)
        self.assertEqual(st.json["grad_norm"], 50.0)
        self.assertEqual(st.json["params"], [1.0 - 0.3, 2.0 - 0.4])

    def test_schedule_patched_mid_run_uses_step_count(self):
        """f(t) counts the steps already applied, also for a schedule set later."""
        name, _ = self.new(hyperparams={"lr": 1.0})
        for _ in range(5):
            self.step(name, [0.0, 0.0])
        self.api.patch("/v1/sessions/%s" % name,
                       {"hyperparams": {"lr_schedule": {"type": "multistep", "milestones": [3, 6], "gamma": 0.5}}})
        lrs = [self.step(name, [0.0, 0.0]).json["lr"] for _ in range(3)]
        self.assertEqual(lrs, [0.5, 0.25, 0.25])  # t = 5, 6, 7

    def test_checkpoint_carries_settings(self):
        """GET .../state then PUT .../state: the copy continues with the same lr
        schedule, clipping and round settings."""
        name, _ = self.new(workers=1, round_timeout=7, dtype="float64",
                           hyperparams={"lr": 0.2, "momentum": 0.5, "max_grad_norm": 2.0,
                                        "lr_schedule": {"type": "cosine", "T_max": 6, "eta_min": 0.01,
                                                        "warmup_steps": 2}})
        for k in range(4):
            self.assertEqual(self.step(name, [1.0 + k, -2.0]).status, 200)
        ck = self.api.get("/v1/sessions/%s/state" % name).json
        self.assertEqual(ck["hyperparams"]["lr_schedule"],
                         {"type": "cosine", "T_max": 6, "eta_min": 0.01, "warmup_steps": 2})
        self.assertEqual(ck["hyperparams"]["max_grad_norm"], 2.0)
        copy = uniq("ck")
        ck.pop("name")
        r = self.api.put("/v1/sessions/%s/state" % copy, ck)
        self.assertEqual(r.status, 201, r)
        got = self.api.get("/v1/sessions/%s" % copy).json
        self.assertEqual(got["hyperparams"], ck["hyperparams"])
        self.assertEqual(got["round_timeout"], 7)
        for k in range(8):
            g = [3.0 - k, 0.5 * k]
            ra, rb = self.step(name, g), self.step(copy, g)
            self.assertEqual(ra.json, rb.json, "step %d" % (k + 5))

    def test_optimizers_list_training_hyperparams(self):
        r = self.api.get("/v1/optimizers")
        self.assertEqual(r.status, 200, r)
        opts = {o["name"]: o for o in r.json["optimizers"]}
        self.assertEqual(sorted(opts), sorted(OPTIMIZERS))
        for name, o in opts.items():
            hps = {h["name"]: h for h in o["hyperparams"]}
            with self.subTest(name):
                self.assertIn("lr_schedule", hps)
                self.assertIn("max_grad_norm", hps)
                self.assertIsNone(hps["lr_schedule"].get("default", "missing"))
                self.assertIsNone(hps["max_grad_norm"].get("default", "missing"))
                self.assertEqual(sorted(hps["lr_schedule"].get("schedules", {})),
                                 ["cosine", "exponential", "linear", "multistep", "step"])


if __name__ == "__main__":
    unittest.main()
