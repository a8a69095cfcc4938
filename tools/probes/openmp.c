/* Build probe (Makefile): a C compiler with OpenMP that compiles, links and runs. */
#include <omp.h>
#include <stdio.h>
int main(void) {
    printf("OpenMP %d, %d threads\n", _OPENMP, omp_get_max_threads());
    return omp_get_max_threads() < 1;
}
