/* Build probe (Makefile): NCCL links and loads (several GPUs, one per rank: excb_kernels.cu's
   gradient all-reduce); no GPU is needed to ask its version. */
#include <nccl.h>
#include <stdio.h>
int main(void) {
    int v = 0;
    if (ncclGetVersion(&v) != ncclSuccess) return 1;
    printf("NCCL %d.%d.%d\n", v / 10000, v / 100 % 100, v % 100);
    return 0;
}
