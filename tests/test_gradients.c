/* placeholder, replaced below */
#include "testutil.h"
