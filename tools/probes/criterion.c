/* Build probe (Makefile): Criterion compiles, links and runs one passing test. */
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <stdio.h>
Test(probe, runs) { cr_assert(1); }
ReportHook(POST_ALL)(struct criterion_global_stats *stats) {
    if (stats->tests_passed == 1) printf("Criterion\n");
}
