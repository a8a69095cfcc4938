/* Build probe (Makefile): zlib links and runs (it reads the gzipped IDX files). */
#include <stdio.h>
#include <zlib.h>
int main(void) {
    printf("zlib %s\n", zlibVersion());
    return zlibVersion()[0] == 0;
}
