plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "ai.autoglm.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "ai.autoglm.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            // ExecuTorch ships arm64-v8a and x86_64; phones are arm64
            abiFilters += listOf("arm64-v8a")
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        // the QNN HTP libraries must stay uncompressed and extracted to be dlopen-ed
        jniLibs.useLegacyPackaging = true
    }
}

dependencies {
    implementation(project(":core"))
    // ExecuTorch's Android library; keep it in step with the executorch the bundle was exported
    // with (pyproject.toml pins executorch==1.5.1). For QNN bundles use the QNN-enabled AAR
    // (README: "QNN bundles") together with Qualcomm's runtime libraries in jniLibs/.
    implementation("org.pytorch:executorch-android:1.5.1")
    implementation("com.facebook.fbjni:fbjni:0.7.0")
    implementation("com.facebook.soloader:soloader:0.12.1")
    implementation("androidx.activity:activity-ktx:1.9.3")
}
