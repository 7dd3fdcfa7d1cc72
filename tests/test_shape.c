/* Tests of engine/shape.c and the shaped session layout of engine/session.c:
 * a shape lays its tensors out in group order and finds them by name,
 * refuses what API.md refuses (bad names, dimensions, duplicates, empty
 * groups), and a shaped session keeps each tensor's step and scalar after
 * its buffers, starts each group's buffers as torch does, and re-lays them
 * when a group starts using a buffer. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/engine.h"

static optd_err enc(void *ctx, const optim_info *info, const optim_hparams *hp, const training *tr, char **out)
{
    (void)ctx;
    (void)info;
    (void)hp;
    (void)tr;
    *out = strdup("{}");
    return *out ? OPTD_OK : OPTD_E_NOMEM;
}

static optd_err dec(void *ctx, const optim_info *info, const char *text, optim_hparams *hp, training *tr)
{
    (void)ctx;
    (void)info;
    (void)text;
    (void)hp;
    (void)tr;
    return OPTD_OK;
}

static const engine_codec codec = {.encode = enc, .decode = dec};

/* Groups of tensors given as {group, name, ndim, dims...}. */
static engine_shape *build(const optim_info *info, const optim_hparams *ghp, size_t ngroups,
                           const char *const names[][4], const uint64_t dims[][4][3], const uint32_t ndims[][4],
                           optd_err *rc_out, char *msg)
{
    engine_shape *sh = NULL;
    optd_err rc = engine_shape_new(&sh);
    (void)info;
    for (size_t g = 0; g < ngroups && !rc; g++) {
        rc = engine_shape_add_group(sh, &ghp[g], msg, 256);
        for (size_t t = 0; t < 4 && names[g][t] && !rc; t++)
            rc = engine_shape_add_tensor(sh, names[g][t], dims[g][t], ndims[g][t], msg, 256);
    }
    if (!rc)
        rc = engine_shape_finish(sh, msg, 256);
    *rc_out = rc;
    if (rc) {
        engine_shape_free(sh);
        return NULL;
    }
    return sh;
}

static void test_a_shape_lays_out_its_tensors_in_group_order_and_finds_them(void **state)
{
    (void)state;
    const optim_info *info = optim_find("adam");
    optim_hparams hp[2];
    optim_defaults(info, &hp[0]);
    hp[1] = hp[0];
    hp[1].weight_decay = 0.5;
    const char *const names[2][4] = {{"fc1.weight", "fc2.weight"}, {"fc1.bias", "b/x-y_z"}};
    const uint64_t dims[2][4][3] = {{{2, 3}, {4}}, {{2}, {0}}};
    const uint32_t nd[2][4] = {{2, 1}, {1, 0}};
    char msg[256];
    optd_err rc;
    engine_shape *sh = build(info, hp, 2, names, dims, nd, &rc, msg);
    assert_int_equal(rc, OPTD_OK);
    assert_int_equal(sh->n, 6 + 4 + 2 + 1);
    assert_int_equal(sh->n_tensors, 4);
    assert_int_equal(sh->tensors[2].off, 10);
    assert_int_equal(sh->tensors[3].n, 1); /* a scalar */
    assert_int_equal(sh->tensors[3].group, 1);
    assert_int_equal(engine_shape_find(sh, "fc1.bias"), 2);
    assert_int_equal(engine_shape_find(sh, "b/x-y_z"), 3);
    assert_int_equal(engine_shape_find(sh, "fc3"), -1);
    engine_shape *cp = NULL;
    assert_int_equal(engine_shape_copy(sh, &cp), OPTD_OK);
    assert_int_equal(cp->n, sh->n);
    assert_string_equal(cp->tensors[1].name, "fc2.weight");
    assert_true(cp->groups[1].hp.weight_decay == 0.5);
    engine_shape_unknown_msg(sh, "fc1.bais", "skip", msg, sizeof msg);
    assert_non_null(strstr(msg, "did you mean \"fc1.bias\""));
    engine_shape_free(cp);
    engine_shape_free(sh);
    engine_shape_free(NULL);
}

static void test_a_shape_refuses_bad_names_dimensions_duplicates_and_empty_groups(void **state)
{
    (void)state;
    const optim_info *info = optim_find("sgd");
    optim_hparams hp[2];
    optim_defaults(info, &hp[0]);
    hp[1] = hp[0];
    char msg[256];
    optd_err rc;
    {
        const char *const names[2][4] = {{"a", "a"}, {"b"}};
        const uint64_t dims[2][4][3] = {{{1}, {1}}, {{1}}};
        const uint32_t nd[2][4] = {{1, 1}, {1}};
        assert_null(build(info, hp, 2, names, dims, nd, &rc, msg));
        assert_int_equal(rc, OPTD_E_INVALID);
        assert_non_null(strstr(msg, "twice"));
    }
    {
        const char *const names[2][4] = {{"a b"}, {"b"}};
        const uint64_t dims[2][4][3] = {{{1}}, {{1}}};
        const uint32_t nd[2][4] = {{1}, {1}};
        assert_null(build(info, hp, 2, names, dims, nd, &rc, msg));
        assert_int_equal(rc, OPTD_E_INVALID);
    }
    {
        const char *const names[2][4] = {{"a"}, {"b"}};
        const uint64_t dims[2][4][3] = {{{0}}, {{1}}};
        const uint32_t nd[2][4] = {{1}, {1}};
        assert_null(build(info, hp, 2, names, dims, nd, &rc, msg));
        assert_int_equal(rc, OPTD_E_INVALID);
    }
    {
        const char *const names[2][4] = {{"a"}, {NULL}};
        const uint64_t dims[2][4][3] = {{{1}}, {{1}}};
        const uint32_t nd[2][4] = {{1}, {1}};
        assert_null(build(info, hp, 2, names, dims, nd, &rc, msg));
        assert_non_null(strstr(msg, "group 1 has no tensors"));
    }
    {
        const char *const names[2][4] = {{"a"}, {"b"}};
        const uint64_t dims[2][4][3] = {{{1u << 20, 1u << 20}}, {{1}}};
        const uint32_t nd[2][4] = {{2}, {1}};
        assert_null(build(info, hp, 2, names, dims, nd, &rc, msg));
        assert_non_null(strstr(msg, "more than"));
    }
}

static void test_a_shaped_session_keeps_each_tensors_step_and_starts_each_groups_buffers(void **state)
{
    (void)state;
    const optim_info *info = optim_find("sgd");
    optim_hparams base, hp[2];
    training tr;
    optim_defaults(info, &base);
    engine_training_defaults(&tr);
    hp[0] = base;
    hp[0].momentum = 0.9; /* uses momentum_buffer */
    hp[1] = base;         /* does not */
    const char *const names[2][4] = {{"w", "v"}, {"b"}};
    const uint64_t dims[2][4][3] = {{{3}, {2}}, {{2}}};
    const uint32_t nd[2][4] = {{1, 1}, {1}};
    char msg[256];
    optd_err rc;
    engine_shape *sh = build(info, hp, 2, names, dims, nd, &rc, msg);
    sess *s = NULL;
    assert_int_equal(engine_sess_new(&codec, "s", info, &base, &tr, OPTIM_F32, 7, NULL, 1.0, &s), OPTD_OK);
    assert_null(s->st.buf[0]); /* the session's own hyperparams use no buffer */
    assert_int_equal(engine_sess_set_shape(s, sh), OPTD_OK);
    assert_non_null(s->st.buf[0]); /* a group does */
    assert_int_equal(engine_sess_tstate_bytes(s), 3 * 8);
    assert_int_equal(s->blob_len, 7 * 4 * 2 + 3 * 8 + 8);
    for (size_t t = 0; t < 3; t++)
        assert_int_equal(engine_sess_tensor_step(s, t), 0);
    engine_sess_set_tensor_step(s, 1, 41);
    assert_int_equal(engine_sess_tensor_step(s, 1), 41);
    assert_true(engine_sess_tensor_scalar(s, 0) == 1); /* sgd has no scalar state */
    /* The second group starts using the buffer: its part starts fresh,
     * the first group's keeps its values, the steps are kept. */
    float *mb = s->st.buf[0];
    for (size_t i = 0; i < 7; i++)
        mb[i] = 3.0f;
    optim_hparams ghp[2] = {hp[0], hp[1]};
    ghp[1].momentum = 0.5;
    assert_int_equal(engine_sess_set_all_hparams(s, &base, ghp), OPTD_OK);
    mb = s->st.buf[0];
    for (size_t i = 0; i < 5; i++)
        assert_true(mb[i] == 3.0f);
    for (size_t i = 5; i < 7; i++)
        assert_true(mb[i] == 0.0f);
    assert_int_equal(engine_sess_tensor_step(s, 1), 41);
    assert_true(((float *)s->st.params)[6] == 1.0f);
    engine_sess_free(s);
}

static void test_adagrad_starts_each_groups_sum_at_its_initial_accumulator_value(void **state)
{
    (void)state;
    const optim_info *info = optim_find("adagrad");
    optim_hparams base, hp[2];
    training tr;
    optim_defaults(info, &base);
    engine_training_defaults(&tr);
    base.initial_accumulator_value = 0.25;
    hp[0] = hp[1] = base;
    const char *const names[2][4] = {{"w"}, {"b"}};
    const uint64_t dims[2][4][3] = {{{2}}, {{1}}};
    const uint32_t nd[2][4] = {{1}, {1}};
    char msg[256];
    optd_err rc;
    engine_shape *sh = build(info, hp, 2, names, dims, nd, &rc, msg);
    sess *s = NULL;
    assert_int_equal(engine_sess_new(&codec, "s", info, &base, &tr, OPTIM_F64, 3, NULL, 0, &s), OPTD_OK);
    assert_int_equal(engine_sess_set_shape(s, sh), OPTD_OK);
    for (size_t i = 0; i < 3; i++)
        assert_true(((double *)s->st.buf[0])[i] == 0.25);
    hp[1].initial_accumulator_value = 0.5;
    assert_int_equal(engine_group_check(info, &base, &hp[1], msg, sizeof msg), OPTD_E_INVALID);
    assert_non_null(strstr(msg, "constructor"));
    engine_sess_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_shape_lays_out_its_tensors_in_group_order_and_finds_them),
        cmocka_unit_test(test_a_shape_refuses_bad_names_dimensions_duplicates_and_empty_groups),
        cmocka_unit_test(test_a_shaped_session_keeps_each_tensors_step_and_starts_each_groups_buffers),
        cmocka_unit_test(test_adagrad_starts_each_groups_sum_at_its_initial_accumulator_value),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
