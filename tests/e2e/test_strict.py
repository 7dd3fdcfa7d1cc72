"""Strict request bodies and error messages that teach (API.md Conventions):
a field the contract does not define for a request, at any level, is 422
unknown_field naming it, with the nearest valid name; nothing changes."""

from optd_e2e import DaemonTest, uniq


class StrictBodyTests(DaemonTest):

    def rejected(self, r, field, near=None, status=422, code="unknown_field"):
        err = self.assertError(r, status, code)
        self.assertIn('"%s"' % field, err["message"], r)
        if near:
            self.assertIn('did you mean "%s"?' % near, err["message"], r)
        return err

    def test_create_fields_beside_hyperparams_are_unknown(self):
        for body, field, near in (
                ({"lr": 0.01, "size": 3}, "lr", None),
                ({"hyperparam": {"lr": 0.01}, "size": 3}, "hyperparam", "hyperparams"),
                ({"dtyp": "float64", "size": 3}, "dtyp", "dtype"),
                ({"worker": 4, "size": 3}, "worker", "workers"),
                ({"Optimizer": "sgd", "size": 3}, "Optimizer", "optimizer"),
                ({"size": 3, "parms": [1.0]}, "parms", "params")):
            name = uniq()
            with self.subTest(body=body):
                full = dict({"name": name, "optimizer": "adam"}, **body)
                err = self.rejected(self.d.post("/v1/sessions", full), field, near)
                self.assertError(self.d.get("/v1/sessions/" + name), 404)
                if field == "lr":
                    self.assertIn("hyperparams", err["message"])
                r = self.d.request("PUT", "/v1/sessions/" + name, json_body=dict(full, name=name))
                self.rejected(r, field, near)
                self.assertError(self.d.get("/v1/sessions/" + name), 404)

    def test_unknown_hyperparameter_names_the_nearest(self):
        err = self.rejected(self.d.post("/v1/sessions", {"name": uniq(), "optimizer": "adam", "size": 2,
                                                         "hyperparams": {"beta1": 0.9}}), "beta1", "betas")
        for hp in ("lr", "betas", "eps", "amsgrad"):
            self.assertIn(hp, err["message"])
        err = self.rejected(self.d.post("/v1/sessions", {"name": uniq(), "optimizer": "sgd", "size": 2,
                                                         "hyperparams": {"workers": 2}}), "workers")
        self.assertIn("beside", err["message"])
        self.rejected(self.d.post("/v1/sessions", {"name": uniq(), "optimizer": "sgd", "size": 2, "hyperparams": {
            "lr_schedule": {"type": "step", "step_size": 5, "gama": 0.5}}}), "gama", "gamma")

    def test_unknown_optimizer_lists_the_names(self):
        r = self.d.post("/v1/sessions", {"name": uniq(), "optimizer": "Adam", "size": 2})
        err = self.assertError(r, 422, "unknown_optimizer")
        self.assertIn('did you mean "adam"?', err["message"])
        for opt in ("sgd", "momentum", "nag", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "adamw", "nadam"):
            self.assertIn(opt, err["message"])

    def test_step_body_is_strict_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        for body, field, near in (({"grad": [0.1, 0.2], "lr": 0.5}, "lr", None),
                                  ({"grad": [0.1, 0.2], "los": 1}, "los", "loss"),
                                  ({"grad": [0.1, 0.2], "wieght": 2}, "wieght", "weight"),
                                  ({"gradient": [0.1, 0.2]}, "gradient", "grad")):
            with self.subTest(body=body):
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body=body)
                err = self.rejected(r, field, near)
                if field == "lr":
                    self.assertIn("PATCH", err["message"])
                self.assertUnchanged(name, before)

    def test_patch_is_strict_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "adam", params=[1.0])
        before = self.snapshot(name)
        for body, field, near in (({"lr": 0.5}, "lr", None), ({"hyperparam": {"lr": 0.5}}, "hyperparam", "hyperparams"),
                                  ({"hyperparams": {"lr": 0.5, "beta1": 0.5}}, "beta1", "betas")):
            with self.subTest(body=body):
                r = self.d.request("PATCH", "/v1/sessions/" + name, json_body=body)
                self.rejected(r, field, near)
                self.assertUnchanged(name, before)

    def test_fork_is_strict(self):
        a = uniq()
        self.d.create(a, "adam", params=[1.0])
        b = uniq()
        self.rejected(self.d.post("/v1/sessions", {"name": b, "from": a, "lr": 0.1}), "lr")
        self.rejected(self.d.post("/v1/sessions", {"name": b, "from": a, "hyperparams": {"lrr": 0.1}}), "lrr", "lr")
        self.assertError(self.d.get("/v1/sessions/" + b), 404)

    def test_checkpoint_is_strict_and_takes_everything_get_returns(self):
        a = uniq()
        self.d.create(a, "nadam", params=[1.0, 2.0], workers=1)
        self.d.step(a, [0.1, 0.2])
        st = self.d.get("/v1/sessions/%s/state" % a).json
        b = uniq()
        self.assertEqual(self.d.request("PUT", "/v1/sessions/%s/state" % b, json_body=st).status, 201)
        for bad, field, near in ((dict(st, lr=0.1), "lr", None),
                                 (dict(st, stat=st["state"]), "stat", "state"),
                                 (dict(st, state=dict(st["state"], exp_avgs=[0, 0])), "exp_avgs", "exp_avg"),
                                 (dict(st, hyperparams=dict(st["hyperparams"], momentum=0.9)), "momentum",
                                  "momentum_decay"),
                                 (dict(st, state=dict(st["state"], params=[9, 9])), "params", None)):
            with self.subTest(field=field):
                before = self.snapshot(b)
                self.rejected(self.d.request("PUT", "/v1/sessions/%s/state" % b, json_body=bad), field, near)
                self.assertUnchanged(b, before)
