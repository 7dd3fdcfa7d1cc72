/* The training features beyond torch.optim that a session carries: the
 * learning-rate schedule (closed forms of torch.optim.lr_scheduler, with
 * optional warmup), gradient clipping (clip_grad_norm_) and the worker-round
 * settings, as plain data (http/ reads and writes their JSON forms). */
#include <math.h>
#include <string.h>

#include "engine/engineInt.h"

void engine_training_defaults(training *tr)
{
    memset(tr, 0, sizeof *tr);
    tr->workers = 1;
    tr->min_workers = 1;
    tr->min_workers_follows = true;
    tr->round_timeout = 60;
}

double engine_training_lr(const training *tr, double lr, uint64_t steps_done)
{
    const schedule *s = &tr->sched;
    double t = (double)steps_done;
    if (s->type == SCHED_NONE)
        return lr;
    if (steps_done < s->warmup_steps)
        return lr * ((t + 1) / (double)s->warmup_steps);
    t -= (double)s->warmup_steps;
    switch (s->type) {
    case SCHED_STEP:
        return lr * pow(s->gamma, floor(t / s->step_size));
    case SCHED_MULTISTEP: {
        size_t k = 0; /* bisect_right: milestones <= t */
        while (k < s->n_milestones && s->milestones[k] <= t)
            k++;
        return lr * pow(s->gamma, (double)k);
    }
    case SCHED_EXPONENTIAL:
        return lr * pow(s->gamma, t);
    case SCHED_COSINE:
        return s->eta_min + (lr - s->eta_min) * (1 + cos(M_PI * t / s->T_max)) / 2;
    case SCHED_LINEAR:
        return lr * (s->start_factor + (s->end_factor - s->start_factor) * fmin(s->total_iters, t) / s->total_iters);
    default:
        return lr;
    }
}
