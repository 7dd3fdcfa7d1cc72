/* replay: runs fuzz_decode's LLVMFuzzerTestOneInput once on each file named
 * on the command line, or on every file of each directory named, with no
 * libFuzzer. `make test` builds it with the normal compiler and replays the
 * committed corpus and the regression inputs (tests/fuzz/regress: inputs
 * that once crashed or broke a property), so a fixed bug stays fixed without
 * clang; under `make asan` the same replay runs with the sanitizers.
 *
 * Each input runs in a child process, so one crash does not hide the next.
 * A directory may hold a file KNOWN listing, one per line, inputs of bugs
 * that are reported and not yet fixed: their failure is counted as skipped
 * ("KNOWN ISSUE"), or as failed with STRICT=1 in the environment. Delete the
 * line with the fix. Exit status 0 when nothing else failed. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int passed, failed, known;

/* Reads a whole file; NULL (with a message) when it cannot. */
static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return NULL;
    }
    size_t cap = 4096, n = 0, got;
    unsigned char *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            unsigned char *p = realloc(buf, cap * 2);
            if (!p) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = p;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf)
        fprintf(stderr, "%s: out of memory\n", path);
    *len = n;
    return buf;
}

/* Whether name is listed in the KNOWN file of dir. */
static int is_known(const char *dir, const char *name)
{
    char path[4096], line[512];
    snprintf(path, sizeof path, "%s/KNOWN", dir);
    FILE *f = fopen(path, "r");
    int hit = 0;
    if (!f)
        return 0;
    while (!hit && fgets(line, sizeof line, f)) {
        line[strcspn(line, " \t\r\n#")] = '\0';
        hit = line[0] && strcmp(line, name) == 0;
    }
    fclose(f);
    return hit;
}

static void run_file(const char *dir, const char *path, const char *name)
{
    size_t len;
    unsigned char *buf = slurp(path, &len);
    if (!buf) {
        failed++;
        return;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        LLVMFuzzerTestOneInput(buf, len);
        _exit(0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0) {
        perror("fork");
        status = 1;
    }
    free(buf);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        passed++;
        return;
    }
    const char *how = WIFSIGNALED(status) ? strsignal(WTERMSIG(status)) : "a non-zero exit";
    if (dir && is_known(dir, name) && !getenv("STRICT")) {
        known++;
        printf("KNOWN ISSUE %s: still fails (%s)\n", path, how);
    } else {
        failed++;
        printf("FAIL %s: %s\n", path, how);
    }
}

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void run_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        perror(dir);
        failed++;
        return;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "KNOWN") == 0)
            continue;
        if (n == cap) {
            char **p = realloc(names, (cap = cap ? cap * 2 : 64) * sizeof *names);
            if (!p)
                break;
            names = p;
        }
        if (!(names[n] = strdup(e->d_name)))
            break;
        n++;
    }
    closedir(d);
    if (n > 1)
        qsort(names, n, sizeof *names, cmp);
    for (size_t i = 0; i < n; i++) {
        char path[4096];
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (stat(path, &sb) == 0 && S_ISREG(sb.st_mode))
            run_file(dir, path, names[i]);
        free(names[i]);
    }
    free(names);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0) {
            perror(argv[i]);
            failed++;
        } else if (S_ISDIR(sb.st_mode)) {
            run_dir(argv[i]);
        } else {
            run_file(NULL, argv[i], argv[i]);
        }
    }
    printf("replayed %d inputs through fuzz_decode\n", passed + failed + known);
    /* The plain closing line CI reads. */
    if (known)
        printf("%d passed, %d failed, %d skipped\n", passed, failed, known);
    else
        printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
