/* Build probe (Makefile): oneDNN links and its sgemm runs: 2 x 3 = 6. */
#include <dnnl.h>
#include <stdio.h>
int main(void) {
    float a = 2.f, b = 3.f, c = 0.f;
    if (dnnl_sgemm('N', 'N', 1, 1, 1, 1.f, &a, 1, &b, 1, 0.f, &c, 1) != dnnl_success || c != 6.f) return 1;
    const dnnl_version_t *v = dnnl_version();
    printf("oneDNN %d.%d.%d\n", v->major, v->minor, v->patch);
    return 0;
}
